"""The SigLIP vision tower, the multimodal projector and the merge into text.

Images `(B, N, H, W, 3)` (N image slots per sample) become
`(B, N * mm_tokens_per_image, text_hidden_dim)` soft tokens that replace the
image placeholder tokens of the encoder input, in order: the k-th run of
`mm_tokens_per_image` placeholders in a sample takes that sample's k-th image.
"""

import math

import keras
from keras import ops

from keras_t5gemma.layers.attention import Attention
from keras_t5gemma.layers.feedforward import FeedForward
from keras_t5gemma.layers.normalization import RMSNormalization
from keras_t5gemma.layers.projections import Dense


class VisionLayer(keras.layers.Layer):
    """Pre-LayerNorm transformer layer of SigLIP: `x + attn(ln(x))`, `x + mlp(ln(x))`."""

    def __init__(self, num_heads, intermediate_dim, layer_norm_epsilon, attention_dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_dropout = attention_dropout

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        head_dim = hidden_dim // self.num_heads
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.attention = Attention(
            self.num_heads,
            self.num_heads,
            head_dim,
            query_scale=head_dim**-0.5,
            use_bias=True,
            use_query_key_norm=False,
            dropout=self.attention_dropout,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.feedforward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="feedforward_norm"
        )
        self.feedforward = FeedForward(
            self.intermediate_dim, gated=False, use_bias=True, dtype=self.dtype_policy, name="feedforward"
        )
        for layer in (self.attention_norm, self.attention, self.feedforward_norm, self.feedforward):
            layer.build(input_shape)
        self.built = True

    def call(self, x, training=False):
        x = x + self.attention(self.attention_norm(x), training=training)
        return x + self.feedforward(self.feedforward_norm(x), training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention_dropout": self.attention_dropout,
        }


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2VisionEncoder(keras.layers.Layer):
    """SigLIP encoder plus the projector into the text embedding space.

    Patches of `patch_size` pixels are embedded with a strided convolution,
    position embeddings are added, the layers run, a final LayerNorm follows;
    then the patch grid is average-pooled to `mm_tokens_per_image` tokens,
    RMS-normalised and projected to `output_dim`.

    Args:
        image_size: int, square input size.
        patch_size: int.
        hidden_dim, intermediate_dim, num_layers, num_heads: SigLIP sizes.
        output_dim: int, the text model width.
        mm_tokens_per_image: int, a square number of soft tokens per image.
        layer_norm_epsilon: float, for the LayerNorms and the projector norm.
        attention_dropout: float.

    Call arguments:
        images: `(B, N, H, W, 3)` or `(N, H, W, 3)` float, already converted
            (see `T5Gemma2ImageConverter`).

    Returns:
        `(B, N * mm_tokens_per_image, output_dim)`, or
        `(N, mm_tokens_per_image, output_dim)` for 4-D input.

    Example:
    >>> encoder = T5Gemma2VisionEncoder(image_size=28, patch_size=7, hidden_dim=16,
    ...     intermediate_dim=24, num_layers=1, num_heads=2, output_dim=32, mm_tokens_per_image=4)
    >>> encoder(keras.ops.zeros((2, 3, 28, 28, 3))).shape
    (2, 12, 32)
    """

    def __init__(
        self,
        image_size,
        patch_size,
        hidden_dim,
        intermediate_dim,
        num_layers,
        num_heads,
        output_dim,
        mm_tokens_per_image=256,
        layer_norm_epsilon=1e-6,
        attention_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        patches_per_side = image_size // patch_size
        tokens_per_side = math.isqrt(mm_tokens_per_image)
        if tokens_per_side**2 != mm_tokens_per_image:
            raise ValueError(f"`mm_tokens_per_image` must be a square number; got {mm_tokens_per_image}.")
        if patches_per_side * patch_size != image_size or patches_per_side % tokens_per_side:
            raise ValueError(
                f"`image_size` {image_size} must be a multiple of `patch_size` {patch_size}, and the "
                f"{patches_per_side}x{patches_per_side} patch grid must pool evenly to "
                f"{tokens_per_side}x{tokens_per_side} tokens."
            )
        if hidden_dim % num_heads:
            raise ValueError(f"Vision `hidden_dim` {hidden_dim} must be a multiple of `num_heads` {num_heads}.")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.output_dim = output_dim
        self.mm_tokens_per_image = mm_tokens_per_image
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_dropout = attention_dropout
        self.patches_per_side = patches_per_side
        self.pool_size = patches_per_side // tokens_per_side

        self.patch_embedding = keras.layers.Conv2D(
            hidden_dim,
            patch_size,
            strides=patch_size,
            padding="valid",
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="patch_embedding",
        )
        self.vision_layers = [
            VisionLayer(
                num_heads,
                intermediate_dim,
                layer_norm_epsilon,
                attention_dropout,
                dtype=self.dtype_policy,
                name=f"layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="final_norm"
        )
        self.projector_norm = RMSNormalization(layer_norm_epsilon, dtype=self.dtype_policy, name="projector_norm")
        self.projection = Dense(output_dim, use_bias=False, dtype=self.dtype_policy, name="projection")

    def build(self, input_shape=None):
        num_patches = self.patches_per_side**2
        self.patch_embedding.build((None, self.image_size, self.image_size, 3))
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(num_patches, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        for layer in self.vision_layers:
            layer.build((None, num_patches, self.hidden_dim))
        self.final_norm.build((None, num_patches, self.hidden_dim))
        self.projector_norm.build((None, self.mm_tokens_per_image, self.hidden_dim))
        self.projection.build((None, self.mm_tokens_per_image, self.hidden_dim))
        self.built = True

    def embed_patches(self, images):
        """`(N, H, W, 3)` images to `(N, patches, hidden_dim)`: the patch convolution's kernel as one matmul.

        The patches do not overlap, so the convolution is a matmul over each
        flattened patch. TensorFlow's convolution fails on an empty batch,
        which text-only input gives (forward and gradient alike); the matmul
        works on every backend.
        """
        count, side, size = ops.shape(images)[0], self.patches_per_side, self.patch_size
        # [N, row, y, column, x, 3] -> [N, row, column, y, x, 3]: the kernel's (y, x, channel) order.
        patches = ops.reshape(ops.cast(images, self.compute_dtype), (count, side, size, side, size, 3))
        patches = ops.reshape(ops.transpose(patches, (0, 1, 3, 2, 4, 5)), (count, side * side, size * size * 3))
        kernel = ops.reshape(ops.cast(self.patch_embedding.kernel, self.compute_dtype), (size * size * 3, -1))
        return ops.matmul(patches, kernel) + ops.cast(self.patch_embedding.bias, self.compute_dtype)

    def encode_images(self, images, training=False):
        """`(N, H, W, 3)` images to `(N, mm_tokens_per_image, output_dim)`."""
        x = self.embed_patches(images)
        count = ops.shape(x)[0]
        x = x + ops.cast(self.position_embedding, self.compute_dtype)
        for layer in self.vision_layers:
            x = layer(x, training=training)
        x = self.final_norm(x)
        grid = ops.reshape(x, (count, self.patches_per_side, self.patches_per_side, self.hidden_dim))
        pooled = ops.average_pool(grid, self.pool_size, strides=self.pool_size, padding="valid")
        pooled = ops.reshape(pooled, (count, self.mm_tokens_per_image, self.hidden_dim))
        return self.projection(self.projector_norm(pooled))

    def call(self, images, training=False):
        if len(images.shape) == 4:
            return self.encode_images(images, training=training)
        batch, slots = ops.shape(images)[0], ops.shape(images)[1]
        flat = ops.reshape(images, (batch * slots, *ops.shape(images)[2:]))
        features = self.encode_images(flat, training=training)
        return ops.reshape(features, (batch, slots * self.mm_tokens_per_image, self.output_dim))

    def compute_output_shape(self, input_shape):
        if len(input_shape) == 4:
            return (input_shape[0], self.mm_tokens_per_image, self.output_dim)
        slots = None if input_shape[1] is None else input_shape[1] * self.mm_tokens_per_image
        return (input_shape[0], slots, self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "output_dim": self.output_dim,
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention_dropout": self.attention_dropout,
        }


class ImageMerge(keras.layers.Layer):
    """Puts image soft tokens at the placeholder positions of the text embeddings.

    Call arguments:
        embeddings: `(B, S, D)` text embeddings.
        token_ids: `(B, S)`; `image_token_id` marks placeholders.
        image_features: `(B, M, D)`, the sample's images' tokens in order.

    Each placeholder takes the next unused image token of its sample; other
    positions keep their text embedding. Gathering from the concatenation of
    text and image tokens keeps shapes static and works for M = 0.
    """

    def __init__(self, image_token_id, **kwargs):
        super().__init__(**kwargs)
        self.image_token_id = image_token_id

    def call(self, embeddings, token_ids, image_features):
        is_image = ops.equal(token_ids, self.image_token_id)
        position = ops.cumsum(ops.ones_like(token_ids, dtype="int32"), axis=1) - 1
        image_rank = ops.cumsum(ops.cast(is_image, "int32"), axis=1) - 1
        length = ops.shape(embeddings)[1]
        source_index = ops.where(is_image, length + image_rank, position)
        source = ops.concatenate([embeddings, ops.cast(image_features, embeddings.dtype)], axis=1)
        return ops.take_along_axis(source, source_index[..., None], axis=1)

    def compute_output_shape(self, embeddings_shape, token_ids_shape=None, image_features_shape=None):
        return embeddings_shape

    def get_config(self):
        return {**super().get_config(), "image_token_id": self.image_token_id}


def check_image_placeholders(token_ids, images_per_sample, image_token_id, mm_tokens_per_image):
    """Raises a clear `ValueError` unless every sample has placeholders for its images.

    Args:
        token_ids: int array `(B, S)`.
        images_per_sample: int (image slots, the same for all samples) or a
            sequence of per-sample image counts.
        image_token_id, mm_tokens_per_image: from the model.

    A sample must hold a whole number of `mm_tokens_per_image` placeholder runs,
    and no more runs than it has images; with a slot count (padded image
    tensors), extra slots are padding and allowed.
    """
    import numpy as np

    token_ids = np.asarray(token_ids)
    counts = (token_ids == image_token_id).sum(axis=-1)
    exact = not np.isscalar(images_per_sample)
    available = np.broadcast_to(np.asarray(images_per_sample), counts.shape)
    for sample, (count, images) in enumerate(zip(counts, available)):
        if count % mm_tokens_per_image:
            raise ValueError(
                f"Sample {sample} has {count} image placeholder tokens (id {image_token_id}), which is "
                f"not a multiple of mm_tokens_per_image={mm_tokens_per_image}; was the prompt truncated?"
            )
        needed = count // mm_tokens_per_image
        if needed and not images:
            raise ValueError(
                f"Sample {sample} has {needed} <start_of_image> marker(s) but no image was given. Pass "
                "the images with the prompt, or remove the marker(s)."
            )
        if needed > images or (exact and needed != images):
            raise ValueError(
                f"Sample {sample} has placeholders for {needed} image(s) but {images} image(s) "
                "were given. Each image needs one <start_of_image> marker in the prompt."
            )
