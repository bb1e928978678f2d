"""T5Gemma 2 embeddings: the encoder alone, pooled to one vector per input."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import Task

from keras_t5gemma.layers.pooling import POOLING_MODES
from keras_t5gemma.layers.pooling import SequencePooling
from keras_t5gemma.layers.pooling import l2_normalize
from keras_t5gemma.models.encoder_decoder_backbone import check_token_ids
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder_preprocessor import T5Gemma2EmbedderPreprocessor
from keras_t5gemma.models.task import T5Gemma2Task
from keras_t5gemma.models.task import saved_task_config
from keras_t5gemma.utils.keras_hub_compat import tf


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Embedder(T5Gemma2Task, Task):
    """T5Gemma 2 encoder embeddings: one `(hidden_dim,)` vector per input.

    The bidirectional encoder runs over the prompt (text, or text with
    `<start_of_image>` markers and their images, fused as in
    `T5Gemma2Seq2SeqLM`), and its outputs are pooled: `"mean"` over the real
    tokens, the `"first"` token (`<bos>`), or the `"last"` real token. With
    `normalize` the vectors have unit L2 norm, so a dot product is a cosine
    similarity. Outputs are float32 whatever the model's dtype.

    Image-only inputs (images, no text) take another path: the vision tower
    and projector give `mm_tokens_per_image` soft tokens per image, and the
    vector is their mean (over all of a sample's images), normalised likewise.
    That mean is the image's average input token to the encoder, i.e. a
    vector in the encoder's *input* space, not its output space: compare
    image-only vectors with each other. To compare images with text, embed
    the image through the encoder, e.g. `{"text": "<start_of_image>",
    "images": image}`.

    `from_preset` builds an encoder-only backbone (no decoder built, no
    decoder weights read), from Hugging Face checkpoints and Keras presets
    alike, including presets saved from a `T5Gemma2Seq2SeqLM`.

    Inputs of the functional model (as the preprocessor gives them):
        encoder_token_ids, encoder_padding_mask: int `(B, S)`.
        images (vision models): float `(B, N, H, W, 3)`.

    Output: float32 `(B, hidden_dim)`.

    Args:
        backbone: a `T5Gemma2Backbone` (or a `T5GemmaBackbone`, see
            `T5GemmaEmbedder`), preferably with `encoder_only=True` (a full
            backbone works too; its decoder is left unused).
        preprocessor: a `T5Gemma2EmbedderPreprocessor`, or `None` (then
            inputs are the token-id dicts above).
        pooling: `"mean"`, `"first"` or `"last"`.
        normalize: bool, L2-normalise the vectors.
        train_vision_tower: bool, default `False`: training the embedder
            (e.g. a contrastive model around it) leaves the vision tower and
            the end-of-image embedding frozen. See `T5Gemma2Task.train_vision_tower`.

    Example:
    ```python
    embedder = T5Gemma2Embedder.from_preset("t5gemma2_tiny_digits", pooling="mean")
    vectors = embedder.predict(["sort: 3 1 2", "reverse: 1 2 3"])  # (2, 64)
    image = np.random.randint(0, 255, (300, 400, 3), dtype="uint8")
    vectors = embedder.predict([
        {"text": "A photo: <start_of_image>", "images": image},  # fused
        {"images": image},  # image-only
    ])
    ```
    """

    backbone_cls = T5Gemma2Backbone
    preprocessor_cls = T5Gemma2EmbedderPreprocessor

    def __init__(self, backbone, preprocessor=None, pooling="mean", normalize=True, train_vision_tower=False, **kwargs):
        if pooling not in POOLING_MODES:
            raise ValueError(f"`pooling` must be one of {POOLING_MODES}; got {pooling!r}.")
        vision_encoder = backbone.vision_encoder
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooler = SequencePooling(pooling, normalize=normalize, name="pooler")
        self.image_embedder = None
        if vision_encoder is not None:
            # Image-only vectors, compiled on their own: `(N, H, W, 3)` images
            # to the `(N, hidden_dim)` mean of their soft tokens.
            size = vision_encoder.image_size
            image = keras.Input((size, size, 3), name="image")
            token_mean = SequencePooling("mean", name="image_pooler")(vision_encoder(image))
            self.image_embedder = keras.Model(image, token_mean, name="image_embedder")

        # === Functional model ===
        token_ids = keras.Input((None,), dtype="int32", name="encoder_token_ids")
        padding_mask = keras.Input((None,), dtype="int32", name="encoder_padding_mask")
        inputs = {"encoder_token_ids": token_ids, "encoder_padding_mask": padding_mask}
        images = None
        if vision_encoder is not None:
            images = keras.Input((None, size, size, 3), name="images")
            inputs["images"] = images
        hidden = backbone.encode(token_ids, padding_mask, images)
        super().__init__(inputs=inputs, outputs=self.pooler(hidden, padding_mask), **kwargs)

        # === Config ===
        self.pooling = pooling
        self.normalize = normalize
        self.train_vision_tower = train_vision_tower

    def predict(self, x=None, batch_size=None, **kwargs):
        """Embeds inputs: strings, dicts with `text` and/or `images`, or lists of those.

        Returns a float32 numpy array `(B, hidden_dim)`, one row per input in
        order. Text and fused inputs run through the compiled model in
        batches of `batch_size` (default 32); image-only inputs through the
        vision tower. A `tf.data.Dataset`, or input without a preprocessor,
        goes to `keras.Model.predict` as in other KerasHub tasks.

        Raises:
            ValueError: for empty input, or a sample with neither (non-blank)
                text nor images.
        """
        if self.preprocessor is None or isinstance(x, tf.data.Dataset) or tf.is_tensor(x):
            if isinstance(x, dict):
                check_token_ids(x, self.backbone.vocabulary_size)
            return super().predict(x, batch_size=batch_size, **kwargs)
        samples = self.preprocessor.as_samples(x)
        batch_size = batch_size or 32
        vectors = np.zeros((len(samples), self.outputs[0].shape[-1]), "float32")
        prompts = [i for i, (text, _) in enumerate(samples) if text is not None]
        image_only = [i for i, (text, _) in enumerate(samples) if text is None]
        if prompts:
            prompt_samples = [{"text": samples[i][0], "images": samples[i][1]} for i in prompts]
            vectors[prompts] = self.predict_samples(prompt_samples, batch_size)
        if image_only:
            vectors[image_only] = self.embed_image_samples([samples[i][1] for i in image_only], batch_size)
        return vectors

    def embed_image_samples(self, samples, batch_size=32):
        """Image-only vectors `(len(samples), hidden_dim)`, float32 numpy.

        Args:
            samples: a list with, per sample, a list of images (any sizes;
                converted by the preprocessor's image converter).
            batch_size: images per vision tower call.

        Each vector is the mean of the sample's images' projected soft
        tokens, L2-normalised if `normalize`.
        """
        if self.image_embedder is None:
            raise ValueError("Image-only inputs need a vision model; this backbone is text-only.")
        if self.preprocessor is None:
            raise ValueError("Image-only inputs need a preprocessor to convert the images.")
        images = [image for sample in samples for image in sample]
        owners = np.repeat(np.arange(len(samples)), [len(sample) for sample in samples])
        token_means = [
            self.image_embedder.predict_on_batch(self.preprocessor.convert_images(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        token_means = np.concatenate(token_means)
        # Every image has the same number of tokens, so the mean of the
        # images' means is the mean over all of the sample's tokens.
        vectors = np.stack([token_means[owners == i].mean(axis=0) for i in range(len(samples))])
        if self.normalize:
            vectors = ops.convert_to_numpy(l2_normalize(vectors))
        return vectors.astype("float32")

    def get_config(self):
        return {
            **super().get_config(),
            "pooling": self.pooling,
            "normalize": self.normalize,
            "train_vision_tower": self.train_vision_tower,
        }

    @classmethod
    def load_preset(cls, loader, load_weights=True, pooling=None, normalize=None, **kwargs):
        """`from_preset`: an encoder-only embedder; the decoder is never built.

        `preset` is a preset name, a Keras preset folder (saved from a
        `T5Gemma2Embedder` or a `T5Gemma2Seq2SeqLM`: the decoder's weights
        in the file are not read), an `hf://` handle or a local Hugging Face
        checkpoint (its decoder tensors are not read).

        Args:
            loader: the preset's loader (`from_preset` passes it).
            load_weights: bool.
            pooling, normalize: default to the saved embedder's settings,
                else `"mean"` and `True`.
            **kwargs: `dtype`; `text_only` (Hugging Face checkpoints: no
                vision tower); `backbone`/`preprocessor` to use instead of
                the preset's; other `T5Gemma2Embedder` arguments.
        """
        saved = saved_task_config(loader, cls)
        kwargs["pooling"] = pooling or saved.get("pooling", "mean")
        kwargs["normalize"] = saved.get("normalize", True) if normalize is None else normalize
        backbone_kwargs, kwargs = loader.get_backbone_kwargs(**kwargs)
        if "backbone" not in kwargs:
            backbone_kwargs["encoder_only"] = True
            kwargs["backbone"] = loader.load_backbone(cls.backbone_cls, load_weights, **backbone_kwargs)
        if "preprocessor" not in kwargs:
            text_only = {"image_converter": None} if kwargs["backbone"].vision_encoder is None else {}
            kwargs["preprocessor"] = cls.preprocessor_cls.load_preset(loader, **text_only)
        return cls(**kwargs)
