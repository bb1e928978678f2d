"""Strings and images to T5Gemma 2 encoder inputs, for embeddings."""

import keras
import numpy as np
from keras_hub.models import Preprocessor

from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import T5Gemma2ImageConverter
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import PROMPT_SETTINGS
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import T5Gemma2Tokenizer
from keras_t5gemma.utils.keras_hub_compat import KerasPresetLoader
from keras_t5gemma.utils.keras_hub_compat import check_config_class
from keras_t5gemma.utils.keras_hub_compat import check_file_exists
from keras_t5gemma.utils.keras_hub_compat import load_json
from keras_t5gemma.utils.keras_hub_compat import tf
from keras_t5gemma.utils.preset_utils import PresetMixin

INPUT_KEYS = ("text", "images")


def _sample_images(images):
    """One sample's images as a list: `None`, one image, a list or an `(N, H, W, 3)` array."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    if getattr(images, "ndim", None) == 4:
        return list(images)
    return [images]


def _sample_text(text):
    """A sample's text, or `None` for no text (missing, empty or only whitespace)."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not isinstance(text, str):
        raise ValueError(f"Text to embed must be a string; got {type(text).__name__}.")
    return text if text.strip() else None


def _is_column(value):
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _text_image_pairs(item):
    """`[(text, images)]` of one string or dict; a dict with a list of texts is columns."""
    if isinstance(item, (str, bytes)):
        return [(item, None)]
    if not isinstance(item, dict):
        raise ValueError(
            "Inputs to embed must be strings, dicts with `text` and/or `images`, or lists of "
            f"those; got {type(item).__name__}."
        )
    unknown = sorted(set(item) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(f"An input dict takes the keys {list(INPUT_KEYS)}; got also {unknown}.")
    text, images = item.get("text"), item.get("images")
    if not _is_column(text):
        return [(text, images)]
    images = [None] * len(text) if images is None else list(images)
    if len(images) != len(text):
        raise ValueError(f"`text` has {len(text)} entries but `images` has {len(images)}.")
    return list(zip(text, images))


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2EmbedderPreprocessor(PresetMixin, Preprocessor):
    """Prepares text, and text with images, for `T5Gemma2Embedder`.

    Prompts are laid out exactly as `T5Gemma2Seq2SeqLMPreprocessor` lays out
    encoder prompts (which this layer uses): `<bos>` + prompt, each
    `<start_of_image>` marker expanded to the image block with
    `mm_tokens_per_image` placeholders, right-padded (and truncated) to
    `sequence_length`. A truncated image block is an error.

    Accepted inputs:
    - a string, or a list (or 1-D array) of strings;
    - a dict `{"text": ..., "images": ...}` for one sample, where `images`
      is one image, a list of images or an `(N, H, W, 3)` array, one per
      `<start_of_image>` marker in the text (images of any size, converted
      by the image converter);
    - a dict whose `"text"` is a list: columns, `"images"` then holds one
      entry per sample;
    - a list of such one-sample dicts;
    - inside `tf.data`: a string tensor, or a dict of a string tensor and a
      dense `(B, N, H, W, 3)` image tensor.

    Image-only samples (images, no text) are embedded by
    `T5Gemma2Embedder.predict` from the vision tower, not by this layer.

    Outputs: a dict with `encoder_token_ids` (int) and `encoder_padding_mask`
    (bool), `(B, sequence_length)`, and (vision models only) `images` float
    `(B, N, H, W, 3)`, N the most images of a sample (or
    `max_images_per_prompt`).

    Args:
        tokenizer: a `T5Gemma2Tokenizer`.
        image_converter: a `T5Gemma2ImageConverter`, or `None` for text-only.
        sequence_length: int, padded length.
        mm_tokens_per_image: int, placeholders per image (the model's).
        max_images_per_prompt: optional int, a fixed image slot count.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the prompt.

    Example:
    ```python
    preprocessor = T5Gemma2EmbedderPreprocessor.from_preset(
        "t5gemma2_tiny_digits", sequence_length=16
    )
    preprocessor(["sort: 3 1 2", "reverse: 1 2 3"])["encoder_token_ids"].shape
    # (2, 16)
    ```
    """

    backbone_cls = T5Gemma2Backbone
    tokenizer_cls = T5Gemma2Tokenizer
    image_converter_cls = T5Gemma2ImageConverter
    # Lays out the prompts: the family's seq2seq preprocessor.
    prompt_preprocessor_cls = T5Gemma2Seq2SeqLMPreprocessor

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=512,
        mm_tokens_per_image=256,
        max_images_per_prompt=None,
        add_start_token=True,
        add_end_token=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.image_converter = image_converter
        self.sequence_length = sequence_length
        # The encoder half of the seq2seq preprocessor, which lays out the
        # prompts; its decoder inputs (for an empty target) are dropped.
        self.prompt_preprocessor = self.prompt_preprocessor_cls(
            tokenizer,
            image_converter=image_converter,
            encoder_sequence_length=sequence_length,
            decoder_sequence_length=1,
            mm_tokens_per_image=mm_tokens_per_image,
            max_images_per_prompt=max_images_per_prompt,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
        )
        for name in PROMPT_SETTINGS:
            setattr(self, name, getattr(self.prompt_preprocessor, name))

    @staticmethod
    def as_samples(x):
        """Any accepted Python input as a list of `(text or None, [images])`.

        Raises:
            ValueError: for no samples, a sample with neither text nor
                images, or a dict with other keys.
        """
        if isinstance(x, dict) or not _is_column(x):
            x = [x]
        samples = [pair for item in x for pair in _text_image_pairs(item)]
        if not samples:
            raise ValueError("There is nothing to embed: the input is empty.")
        result = []
        for index, (text, images) in enumerate(samples):
            text, images = _sample_text(text), _sample_images(images)
            if text is None and not images:
                raise ValueError(
                    f"Sample {index} has neither text nor images (empty or whitespace-only text counts as no text)."
                )
            result.append((text, images))
        return result

    def convert_images(self, images):
        """A list of images of any sizes to a float `(N, H, W, 3)` array for the vision tower."""
        if self.image_converter is None:
            raise ValueError("Images were given but this preprocessor has no image converter (text-only model).")
        size = self.image_converter.image_size
        converted = [np.asarray(self.image_converter(image), "float32") for image in images]
        return np.stack(converted) if converted else np.zeros((0, *size, 3), "float32")

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        text, images = self._text_and_images(x)
        if tf.is_tensor(text):
            empty = tf.zeros_like(text)
        else:
            empty = [""] * len(text) if isinstance(text, list) else ""
        prompt = {"encoder_text": text, "decoder_text": empty}
        if images is not None:
            prompt["images"] = images
        encoder_inputs = self.prompt_preprocessor(
            prompt, encoder_sequence_length=sequence_length or self.sequence_length
        )[0]
        encoder_inputs = {k: v for k, v in encoder_inputs.items() if not k.startswith("decoder_")}
        return keras.utils.pack_x_y_sample_weight(encoder_inputs, y, sample_weight)

    def _text_and_images(self, x):
        """`(text, images)` for the prompt preprocessor; lists for Python input."""
        if tf.is_tensor(x) or (isinstance(x, dict) and tf.is_tensor(x.get("text"))):
            text, images = (x, None) if tf.is_tensor(x) else (x["text"], x.get("images"))
            if images is None and self.image_converter is not None:
                # No image slots; inside `tf.data` the batch size is known only when it runs.
                size = self.image_converter.image_size
                images = tf.zeros(tf.concat([tf.shape(text), [0, *size, 3]], 0))
            return text, images
        samples = self.as_samples(x)
        image_only = [index for index, (text, _) in enumerate(samples) if text is None]
        if image_only:
            raise ValueError(
                f"Samples {image_only} have images but no text. Image-only inputs are embedded "
                "from the vision tower by `T5Gemma2Embedder.predict`; this layer prepares prompts."
            )
        texts = [text for text, _ in samples]
        images = [sample_images for _, sample_images in samples]
        if self.image_converter is None:
            # No converter: the prompt preprocessor reports images as an error.
            images = images if any(images) else None
        single = isinstance(x, (str, bytes)) or (isinstance(x, dict) and not _is_column(x.get("text")))
        if single:
            return texts[0], None if images is None else images[0]
        return texts, images

    def get_config(self):
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            **{name: getattr(self, name) for name in PROMPT_SETTINGS},
        }

    @classmethod
    def from_seq_2_seq_preprocessor(cls, preprocessor, **kwargs):
        """The embedding preprocessor with the encoder settings of a `T5Gemma2Seq2SeqLMPreprocessor`.

        `kwargs` override them (e.g. `sequence_length`, `image_converter=None`).
        """
        settings = {
            "tokenizer": preprocessor.tokenizer,
            "image_converter": preprocessor.image_converter,
            "sequence_length": preprocessor.encoder_sequence_length,
            **{name: getattr(preprocessor, name) for name in PROMPT_SETTINGS},
        }
        return cls(**{**settings, **kwargs})

    @classmethod
    def load_preset(cls, loader, config_file="preprocessor.json", **kwargs):
        """`from_preset`, which also takes the Keras preset of a `T5Gemma2Seq2SeqLM`.

        A Keras preset saved from a `T5Gemma2Seq2SeqLM` gives its encoder
        settings (see `from_seq_2_seq_preprocessor`).
        """
        if isinstance(loader, KerasPresetLoader) and check_file_exists(loader.preset, config_file):
            saved_class = check_config_class(load_json(loader.preset, config_file))
            if issubclass(saved_class, T5Gemma2Seq2SeqLMPreprocessor):
                seq_2_seq = loader.load_preprocessor(saved_class, config_file)
                return cls.from_seq_2_seq_preprocessor(seq_2_seq, **kwargs)
        return loader.load_preprocessor(cls, config_file, **kwargs)
