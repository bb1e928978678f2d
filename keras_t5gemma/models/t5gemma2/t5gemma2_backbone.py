"""T5Gemma 2 backbone: a Gemma 3 encoder and decoder sharing one embedding."""

import keras
import numpy as np
from keras import ops

from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.token_embedding import TokenEmbedding
from keras_t5gemma.layers.transformer import TransformerStack
from keras_t5gemma.layers.vision import ImageMerge
from keras_t5gemma.layers.vision import check_image_placeholders
from keras_t5gemma.models.encoder_decoder_backbone import EncoderDecoderBackbone
from keras_t5gemma.models.encoder_decoder_backbone import check_attention_sizes
from keras_t5gemma.models.encoder_decoder_backbone import check_layer_types
from keras_t5gemma.models.encoder_decoder_backbone import check_positive_int
from keras_t5gemma.models.encoder_decoder_backbone import check_regularisation
from keras_t5gemma.models.encoder_decoder_backbone import layer_arguments
from keras_t5gemma.utils.preset_utils import get_exporter


def default_layer_types(num_layers, full_attention_every=6):
    """Gemma 3's pattern: every sixth layer attends fully, the others slide."""
    return [FULL if (i + 1) % full_attention_every == 0 else SLIDING for i in range(num_layers)]


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Backbone(EncoderDecoderBackbone):
    """T5Gemma 2 encoder-decoder backbone.

    A bidirectional Gemma 3 encoder and a Gemma 3 decoder whose attention
    covers its own (causal) keys and the encoder's keys in one softmax. One
    token embedding table serves the encoder input, the decoder input and the
    output projection (see `T5Gemma2Backbone.token_embedding.logits`).

    Inputs:
        encoder_token_ids: int `(B, S)`.
        encoder_padding_mask: int/bool `(B, S)`, 1 for real tokens.
        decoder_token_ids: int `(B, T)`.
        decoder_padding_mask: int/bool `(B, T)`.
        images: (only with a `vision_encoder`) float `(B, N, H, W, 3)`, N image
            slots per sample, converted by `T5Gemma2ImageConverter`. The k-th
            run of `mm_tokens_per_image` image placeholder tokens in a sample
            takes its k-th image; unused slots are padding. Samples may have 0,
            1 or several images; `N` may be 0, and `images` may be left out
            for text-only input, in which case the vision tower runs on no images.

    Outputs (dict):
        encoder_sequence_output: `(B, S, hidden_dim)`.
        decoder_sequence_output: `(B, T, hidden_dim)`, after the final norm.

    Args:
        vocabulary_size: int.
        hidden_dim: int, model width of both stacks.
        intermediate_dim: int, GeGLU width.
        num_heads: int, query heads.
        num_key_value_heads: int, key/value heads (grouped-query attention).
        head_dim: int.
        num_encoder_layers, num_decoder_layers: int.
        encoder_layer_types, decoder_layer_types: optional lists of
            `"sliding_attention"` / `"full_attention"`; default every sixth
            layer full.
        sliding_window: int, the stored window. The decoder sees the last
            `sliding_window` keys; the encoder splits it around each query.
        query_pre_attn_scalar: float, logits are scaled by its inverse square
            root. Defaults to `head_dim`.
        local_rope_wavelength, global_rope_wavelength: RoPE bases of sliding
            and full layers.
        local_rope_scaling_factor, global_rope_scaling_factor: linear RoPE
            scaling of sliding and full layers.
        layer_norm_epsilon: float.
        attention_logit_soft_cap, final_logit_soft_cap: optional floats.
        dropout: float, on embeddings, block outputs, MLP activations and the
            stack outputs.
        attention_dropout: float, on attention probabilities.
        eoi_token_id: int, the end-of-image token with a learned embedding.
        image_token_id: int, the image placeholder token.
        vision_encoder: optional `T5Gemma2VisionEncoder`; without it the
            backbone is text-only.
        encoder_only: bool. Build no decoder (for embeddings): the inputs are
            then only the encoder's, and the output only
            `encoder_sequence_output`.
        remat: bool. Recompute each transformer layer in the backward pass
            instead of keeping its activations, for training on long inputs:
            a gradient then holds each layer's input, not its activations.
            Off by default; inference is unaffected.
        dtype: dtype policy, e.g. `"float32"`, `"bfloat16"`, `"mixed_bfloat16"`.

    Example:
    ```python
    backbone = T5Gemma2Backbone(
        vocabulary_size=300, hidden_dim=32, intermediate_dim=64, num_heads=4,
        num_key_value_heads=2, head_dim=8, num_encoder_layers=2,
        num_decoder_layers=2, sliding_window=4, eoi_token_id=298,
        image_token_id=299,
    )
    outputs = backbone({
        "encoder_token_ids": np.ones((1, 6), "int32"),
        "encoder_padding_mask": np.ones((1, 6), "int32"),
        "decoder_token_ids": np.ones((1, 3), "int32"),
        "decoder_padding_mask": np.ones((1, 3), "int32"),
    })
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        intermediate_dim,
        num_heads,
        num_key_value_heads,
        head_dim,
        num_encoder_layers,
        num_decoder_layers,
        encoder_layer_types=None,
        decoder_layer_types=None,
        sliding_window=512,
        query_pre_attn_scalar=None,
        local_rope_wavelength=10_000.0,
        global_rope_wavelength=1_000_000.0,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        dropout=0.0,
        attention_dropout=0.0,
        eoi_token_id=256_000,
        image_token_id=256_001,
        vision_encoder=None,
        encoder_only=False,
        remat=False,
        dtype=None,
        **kwargs,
    ):
        check_attention_sizes("", num_heads, num_key_value_heads, head_dim)
        check_positive_int("sliding_window", sliding_window)
        check_regularisation(dropout, attention_dropout, attention_logit_soft_cap, final_logit_soft_cap)
        encoder_layer_types = list(encoder_layer_types or default_layer_types(num_encoder_layers))
        decoder_layer_types = list(decoder_layer_types or default_layer_types(num_decoder_layers))
        check_layer_types("encoder_layer_types", encoder_layer_types, num_encoder_layers)
        check_layer_types("decoder_layer_types", decoder_layer_types, num_decoder_layers)
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = head_dim

        # === Layers ===
        self.token_embedding = TokenEmbedding(
            vocabulary_size,
            hidden_dim,
            eoi_token_id=eoi_token_id,
            logit_soft_cap=final_logit_soft_cap,
            dtype=dtype,
            name="token_embedding",
        )
        layer_kwargs = layer_arguments(
            intermediate_dim,
            num_heads,
            num_key_value_heads,
            head_dim,
            query_pre_attn_scalar,
            layer_norm_epsilon,
            attention_logit_soft_cap,
            attention_dropout,
        )
        rope = {
            SLIDING: (local_rope_wavelength, local_rope_scaling_factor),
            FULL: (global_rope_wavelength, global_rope_scaling_factor),
        }

        def stack(name, layer_types, causal):
            return TransformerStack(
                layer_types,
                causal=causal,
                sliding_window=sliding_window,
                rope=rope,
                layer_kwargs=layer_kwargs,
                dropout=dropout,
                remat=remat,
                dtype=dtype,
                name=name,
            )

        self.encoder = stack("encoder", encoder_layer_types, causal=False)
        self.decoder = None if encoder_only else stack("decoder", decoder_layer_types, causal=True)
        self.vision_encoder = vision_encoder
        if vision_encoder is not None:
            if vision_encoder.output_dim != hidden_dim:
                raise ValueError(
                    f"The vision encoder projects to {vision_encoder.output_dim} but the text width is {hidden_dim}."
                )
            self.image_merge = ImageMerge(image_token_id, dtype=dtype, name="image_merge")

        # === Functional model ===
        image_size = None if vision_encoder is None else vision_encoder.image_size
        self._build_functional_model(encoder_only, image_size=image_size, dtype=dtype, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.encoder_layer_types = encoder_layer_types
        self.decoder_layer_types = decoder_layer_types
        self.sliding_window = sliding_window
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.local_rope_wavelength = local_rope_wavelength
        self.global_rope_wavelength = global_rope_wavelength
        self.local_rope_scaling_factor = local_rope_scaling_factor
        self.global_rope_scaling_factor = global_rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.eoi_token_id = eoi_token_id
        self.image_token_id = image_token_id
        self.encoder_only = encoder_only
        self.remat = remat

    def encode(self, token_ids, padding_mask, images=None, training=False):
        """Encoder output `(B, S, D)`; images (if any) replace their placeholders.

        With `images=None` the vision tower is skipped.
        """
        embeddings = self.token_embedding(token_ids)
        if images is not None and self.vision_encoder is not None:
            features = self.vision_encoder(images, training=training)
            embeddings = self.image_merge(embeddings, token_ids, features)
        return self.encoder(embeddings, padding_mask, training=training)

    def with_default_images(self, inputs):
        """`inputs` with an empty `(B, 0, H, W, 3)` `images` entry if a vision model lacks one.

        Text-only input to a vision backbone keeps the functional signature this
        way, and the vision tower runs on no images.
        """
        if self.vision_encoder is None or not isinstance(inputs, dict) or inputs.get("images") is not None:
            return inputs
        token_ids = inputs["encoder_token_ids"]
        size = self.vision_encoder.image_size
        shape = (ops.shape(token_ids)[0], 0, size, size, 3)
        # Keras will not mix numpy and backend tensors in one call argument.
        zeros = np.zeros if isinstance(token_ids, np.ndarray) else ops.zeros
        return {**inputs, "images": zeros(shape, "float32")}

    def export_to_transformers(self, path, dtype=None, max_shard_size="2GB", overwrite=False):
        """Writes a Hugging Face `transformers` folder (`T5Gemma2ForConditionalGeneration`) of this backbone.

        The arguments and errors are those of `T5Gemma2Task.export_to_transformers`.
        """
        exporter = get_exporter("transformers")
        return exporter(self, path, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)

    def _check_inputs(self, inputs):
        """Token ids in range and image placeholders matching the images (eager calls only)."""
        checked = super()._check_inputs(inputs)
        if "encoder_token_ids" in checked and self.vision_encoder is not None:
            check_image_placeholders(
                checked["encoder_token_ids"],
                ops.shape(inputs["images"])[1],
                self.image_token_id,
                self.vision_encoder.mm_tokens_per_image,
            )
        return checked

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "encoder_layer_types": self.encoder_layer_types,
            "decoder_layer_types": self.decoder_layer_types,
            "sliding_window": self.sliding_window,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "local_rope_wavelength": self.local_rope_wavelength,
            "global_rope_wavelength": self.global_rope_wavelength,
            "local_rope_scaling_factor": self.local_rope_scaling_factor,
            "global_rope_scaling_factor": self.global_rope_scaling_factor,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "vision_encoder": None if self.vision_encoder is None else keras.layers.serialize(self.vision_encoder),
            "encoder_only": self.encoder_only,
            "remat": self.remat,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("vision_encoder"), dict):
            vision = _with_quantized_layers(config["vision_encoder"], config.get("dtype"))
            config["vision_encoder"] = keras.layers.deserialize(vision)
        return super().from_config(config)


def _with_quantized_layers(vision_config, dtype):
    """The vision encoder's config, given the quantized layers of the backbone's `dtype` policy map.

    A quantized backbone saves which layers are quantized as a
    `DTypePolicyMap` in its own `dtype`; the vision encoder is saved as a
    layer of its own, with its float policy, so without this it would be
    rebuilt with float kernels that its saved int8 weights do not fit.
    """
    policy = keras.dtype_policies.get(dtype) if isinstance(dtype, dict) else dtype
    if not isinstance(policy, keras.dtype_policies.DTypePolicyMap) or not len(policy):
        return vision_config
    own = vision_config["config"].get("dtype")
    vision_policy = keras.dtype_policies.DTypePolicyMap(
        default_policy=keras.dtype_policies.get(own) if own is not None else None,
        policy_map={path: policy[path] for path in policy},
    )
    return {**vision_config, "config": {**vision_config["config"], "dtype": vision_policy}}
