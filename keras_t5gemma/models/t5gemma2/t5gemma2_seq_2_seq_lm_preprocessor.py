"""Strings (and images) to T5Gemma 2 encoder/decoder inputs, labels and weights."""

import threading

import keras
import numpy as np
from keras_hub.layers import StartEndPacker
from keras_hub.models import Seq2SeqLMPreprocessor

from keras_t5gemma.layers.vision import check_image_placeholders
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import T5Gemma2ImageConverter
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import START_OF_IMAGE_PIECE
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import T5Gemma2Tokenizer
from keras_t5gemma.utils.keras_hub_compat import preprocessing_function
from keras_t5gemma.utils.keras_hub_compat import tf
from keras_t5gemma.utils.preset_utils import PresetMixin

# What the reference processor puts around each image (`<start_of_image>` in a
# prompt marks where an image goes); the placeholders go between the markers.
IMAGE_BLOCK = f"\n\n{START_OF_IMAGE_PIECE}<end_of_image>\n\n"


# How prompts are laid out, shared with `T5Gemma2EmbedderPreprocessor`.
PROMPT_SETTINGS = ("mm_tokens_per_image", "max_images_per_prompt", "add_start_token", "add_end_token")

# Held while a preprocessor builds: threads calling `generate` on a freshly
# loaded model would otherwise both build it, the second into a locked layer.
_BUILD_LOCK = threading.RLock()


def check_texts(text, name):
    """Refuses Python inputs that are not strings, and empty batches; tensors pass.

    Raises:
        ValueError: naming `name` (and the item) and what was found.
    """
    if tf.is_tensor(text):
        return
    if isinstance(text, np.ndarray):
        if text.dtype.kind not in "USO":
            raise ValueError(f"`{name}` must hold strings; got an array of {text.dtype}.")
        if text.size == 0:
            raise ValueError(f"`{name}` is an empty batch: give at least one text.")
        return
    if isinstance(text, str):
        return
    if isinstance(text, (list, tuple)):
        if not text:
            raise ValueError(f"`{name}` is an empty batch: give at least one text.")
        for index, item in enumerate(text):
            if not isinstance(item, str):
                raise ValueError(f"`{name}[{index}]` is {_describe(item)}; texts must be strings.")
        return
    raise ValueError(f"`{name}` must be a string or a list of strings; got {_describe(text)}.")


class TruncationWarning(UserWarning):
    """Training examples longer than the sequence lengths were cut (see `TruncationReport`)."""


class TruncationReport:
    """What cutting examples to the sequence lengths removes: per side, the tokens cut from each cut example.

    Attributes:
        examples: int, the examples counted.
        encoder_cuts, decoder_cuts: int arrays, the tokens cut from each
            input (target) that was cut.
        encoder_sequence_length, decoder_sequence_length: the lengths.
    """

    def __init__(self, examples, encoder_cuts, decoder_cuts, encoder_sequence_length, decoder_sequence_length):
        self.examples = examples
        self.encoder_cuts, self.decoder_cuts = encoder_cuts, decoder_cuts
        self.encoder_sequence_length = encoder_sequence_length
        self.decoder_sequence_length = decoder_sequence_length

    def __bool__(self):
        return bool(len(self.encoder_cuts) or len(self.decoder_cuts))

    def message(self, encoder_name="encoder_sequence_length", decoder_name="decoder_sequence_length"):
        """One sentence: how many inputs and targets were cut, to what length, and by how many tokens."""
        parts = []
        for cuts, what, name, length in (
            (self.encoder_cuts, "inputs", encoder_name, self.encoder_sequence_length),
            (self.decoder_cuts, "targets", decoder_name, self.decoder_sequence_length),
        ):
            if len(cuts):
                spread = f"{cuts.min()}" if cuts.min() == cuts.max() else f"{cuts.min()} to {cuts.max()}"
                parts.append(
                    f"{len(cuts)} of {self.examples} {what} were cut to {name} {length} "
                    f"(by {spread} tokens; {int(cuts.sum())} tokens in all)"
                )
        return "; ".join(parts) + ". Raise the length to train on whole examples."


def _describe(value):
    hint = " (decode bytes first: `value.decode()`)" if isinstance(value, bytes) else ""
    return f"{type(value).__name__} {value!r:.60}{hint}"


def _holds_images(images):
    """Whether `images` (an array, a tensor, a PIL image or per-sample lists of them) holds an image, or may."""
    if images is None:
        return False
    shape = getattr(images, "shape", None)
    if shape is not None:
        return 0 not in tuple(shape)
    if isinstance(images, (list, tuple)):
        return any(_holds_images(item) for item in images)
    return True


def _renamed(old_name, old_value, name, value):
    """`value`, or the earlier argument's value when only that was given; both and different is an error."""
    if old_value is None:
        return value
    if value is not None and value != old_value:
        raise ValueError(f"`{old_name}` (the earlier name of `{name}`) is {old_value!r} but `{name}` is {value!r}.")
    return old_value


def _image_converter_of_size(image_converter, image_size):
    """The image converter, made for KerasHub's `image_size` when none is given; a size it does not have is refused."""
    if image_size is None:
        return image_converter
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if image_converter is None:
        return T5Gemma2ImageConverter(image_size=size)
    if image_converter.image_size is None or tuple(image_converter.image_size) != size:
        raise ValueError(
            f"`image_size` is {image_size!r} but the image converter makes images of size "
            f"{image_converter.image_size}; give one of them, or the same size to both."
        )
    return image_converter


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Seq2SeqLMPreprocessor(PresetMixin, Seq2SeqLMPreprocessor):
    """Prepares T5Gemma 2 inputs as the reference trains and generates.

    - Encoder: `<bos>` + prompt (the reference tokenizer adds `<bos>` and no
      `<eos>`; both are configurable). Each `<start_of_image>` in a prompt is
      expanded as the reference processor does, to `"\\n\\n<start_of_image>"`,
      `num_vision_tokens_per_image` image placeholders,
      `"<end_of_image>\\n\\n"`; it takes the sample's next image.
    - Decoder: `<bos>` + target; labels are the target followed by `<eos>`
      (the reference's right shift of `target + <eos>` with `<bos>` as the
      decoder start token); `sample_weight` is 0 on padding.
    - Images (optional), converted by the image converter and padded to
      `(B, N, H, W, 3)`: either per sample a list of images (any sizes; the
      number of images must equal the sample's markers), or a dense
      `(B, N, H, W, 3)` array of N image slots per sample, of which each
      sample uses as many as it has markers (what `fit` on in-memory data
      and `tf.data` need). N is `max_images_per_prompt` if set, else the
      most images of any sample.

    Inputs are a dict with `"encoder_text"`, `"decoder_text"` and optionally
    `"images"`, or encoder strings as `x` and decoder strings as `y`. Strings
    may be scalars, lists or tensors; this works inside `tf.data`.

    Args (KerasHub 0.32's names and meanings; pass all but `tokenizer` by
    keyword, as KerasHub's second positional argument is
    `encoder_sequence_length` and ours `image_converter`):
        tokenizer: a `T5Gemma2Tokenizer`. A vocabulary without the image
            pieces works for text; images are then refused, naming them.
        image_converter: a `T5Gemma2ImageConverter`, or `None`.
        encoder_sequence_length, decoder_sequence_length: padded lengths.
            Longer inputs are truncated when training; `generate` refuses
            prompts that do not fit.
        image_size: int (or `(height, width)`), the side of the images the
            vision tower takes, or `None` for a text-only model. Without an
            `image_converter` one is made with this size and the
            reference's normalisation (KerasHub uses the size only for the
            dummy images of text-only input); with one, it must match.
        num_vision_tokens_per_image: int, placeholders per image (the
            model's); default 256, the released models'. Was
            `mm_tokens_per_image`, still accepted.
        max_images_per_prompt: optional int, a fixed image slot count.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the prompt.
            The defaults (`True`, `False`) are the reference's; KerasHub's
            are `False`, `True`.

    KerasHub's `vision_indices` input is not produced: the placeholders in
    `encoder_token_ids` mark where each image goes.

    Example:
    ```python
    preprocessor = T5Gemma2Seq2SeqLMPreprocessor.from_preset("t5gemma2_tiny_digits")
    x, y, sample_weight = preprocessor(
        {"encoder_text": ["reverse: 1 2 3"], "decoder_text": ["3 2 1"]}
    )
    ```
    """

    backbone_cls = T5Gemma2Backbone
    tokenizer_cls = T5Gemma2Tokenizer
    image_converter_cls = T5Gemma2ImageConverter

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        encoder_sequence_length=512,
        decoder_sequence_length=512,
        image_size=None,
        num_vision_tokens_per_image=None,
        max_images_per_prompt=None,
        add_start_token=True,
        add_end_token=False,
        **kwargs,
    ):
        if isinstance(image_converter, int):
            raise ValueError(
                f"`image_converter` is {image_converter!r}, an int: pass `encoder_sequence_length` (KerasHub's second "
                "positional argument) and the other settings by keyword."
            )
        num_vision_tokens_per_image = _renamed(
            "mm_tokens_per_image",
            kwargs.pop("mm_tokens_per_image", None),
            "num_vision_tokens_per_image",
            num_vision_tokens_per_image,
        )
        super().__init__(
            tokenizer,
            encoder_sequence_length=encoder_sequence_length,
            decoder_sequence_length=decoder_sequence_length,
            **kwargs,
        )
        self.image_converter = _image_converter_of_size(image_converter, image_size)
        self.num_vision_tokens_per_image = 256 if num_vision_tokens_per_image is None else num_vision_tokens_per_image
        self.max_images_per_prompt = max_images_per_prompt
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    @property
    def mm_tokens_per_image(self):
        """The earlier name of `num_vision_tokens_per_image`."""
        return self.num_vision_tokens_per_image

    def _uses_images(self):
        """Whether prompts get image blocks: an image converter and a vocabulary with the image pieces."""
        return self.image_converter is not None and not self.tokenizer.missing_image_tokens

    def build(self, input_shape):
        with _BUILD_LOCK:
            if not self.built:
                self._build_packers()

    def _build_packers(self):
        tokenizer = self.tokenizer
        self.encoder_packer = StartEndPacker(
            start_value=tokenizer.start_token_id if self.add_start_token else None,
            end_value=tokenizer.end_token_id if self.add_end_token else None,
            pad_value=tokenizer.pad_token_id,
            sequence_length=self.encoder_sequence_length,
            return_padding_mask=True,
        )
        self.decoder_packer = StartEndPacker(
            start_value=tokenizer.start_token_id,
            end_value=tokenizer.end_token_id,
            pad_value=tokenizer.pad_token_id,
            sequence_length=self.decoder_sequence_length,
            return_padding_mask=True,
        )
        self.built = True

    # === Images ===

    def _images(self, images, batched):
        """Converted images `(B, N, H, W, 3)` and per-sample counts, or `(None, None)`."""
        if images is None:
            return None, None
        if self.image_converter is None:
            raise ValueError("Images were given but this preprocessor has no image converter (text-only model).")
        missing = self.tokenizer.missing_image_tokens
        if missing and _holds_images(images):
            raise ValueError(
                f"Images were given but the tokenizer's vocabulary has no {', '.join(missing)}: it holds text "
                "only. Use a vocabulary with the image pieces (Gemma 3's), or give the tokenizer "
                "`image_placeholder`, the piece that marks an image token."
            )
        if tf.is_tensor(images) and not tf.executing_eagerly():
            return self._graph_images(images, batched)
        if hasattr(images, "ndim") and images.ndim == (5 if batched else 4):
            # A dense array: N image slots per sample, of which each sample
            # uses as many as it has markers.
            flat = np.reshape(np.asarray(images), (-1, *np.shape(images)[-3:]))
            converted = np.asarray(self.image_converter(flat)) if len(flat) else None
            slots = self._slots(np.shape(images)[-4])
            shape = (*np.shape(images)[:-4], slots, *self.image_converter.image_size, 3)
            dense = np.zeros(shape, "float32")
            if converted is not None:
                dense[..., : np.shape(images)[-4], :, :, :] = converted.reshape(
                    (*np.shape(images)[:-3], *converted.shape[-3:])
                )
            return dense, slots
        samples = list(images) if batched else [images]
        converted = []
        for sample in samples:
            if sample is None:
                sample = []
            elif hasattr(sample, "ndim") and getattr(sample, "ndim") == 4:
                sample = list(sample)
            elif not isinstance(sample, (list, tuple)):
                sample = [sample]
            converted.append([np.asarray(self.image_converter(image)) for image in sample])
        counts = [len(sample) for sample in converted]
        slots = self._slots(max(counts, default=0))
        size = self.image_converter.image_size
        dense = np.zeros((len(converted), slots, *size, 3), "float32")
        for row, sample in enumerate(converted):
            for column, image in enumerate(sample):
                dense[row, column] = image
        return (dense if batched else dense[0]), counts

    def _graph_images(self, images, batched):
        """`tf.data` path: a dense tensor of N images per sample."""
        rank = 5 if batched else 4
        if images.shape.rank == rank - 1:
            images = images[:, None] if batched else images[None]
        flat = tf.reshape(images, tf.concat([[-1], tf.shape(images)[-3:]], 0))
        converted = self.image_converter(flat)
        shape = tf.concat([tf.shape(images)[:-3], tf.shape(converted)[1:]], 0)
        converted = tf.reshape(converted, shape)
        count = tf.shape(images)[-4]
        slots = self.max_images_per_prompt
        if slots is not None:
            padding = [[0, 0]] * (rank - 4) + [[0, slots - count], [0, 0], [0, 0], [0, 0]]
            converted = tf.pad(converted, padding)
        return converted, count

    def _slots(self, most):
        if self.max_images_per_prompt is None:
            return most
        if most > self.max_images_per_prompt:
            raise ValueError(f"A sample has {most} images but `max_images_per_prompt` is {self.max_images_per_prompt}.")
        return self.max_images_per_prompt

    # === Text ===

    def _tokenize(self, text):
        """Token ids as TF tensors (eagerly, KerasHub tokenizers return Python lists)."""
        token_ids = self.tokenizer(text)
        if isinstance(token_ids, list):
            batched = bool(token_ids) and isinstance(token_ids[0], list)
            make = tf.ragged.constant if batched else tf.constant
            token_ids = make(token_ids, dtype="int32")
        return token_ids

    def _expanded_prompts(self, text):
        """Tokenized prompts with each image marker expanded to its block (plain text without the marker piece)."""
        if self.tokenizer.start_of_image_token_id is None:
            return self._tokenize(text)
        text = tf.strings.regex_replace(text, START_OF_IMAGE_PIECE, IMAGE_BLOCK)
        token_ids = self._tokenize(text)
        if not self._uses_images():
            return token_ids
        self._refuse_placeholders_in_text(token_ids)
        return self._insert_placeholders(token_ids)

    def _refuse_placeholders_in_text(self, token_ids):
        """The image placeholder typed in a prompt would take an image's place (and get none)."""
        flat = token_ids.flat_values if isinstance(token_ids, tf.RaggedTensor) else tf.reshape(token_ids, [-1])
        placeholder = self.tokenizer.image_placeholder_token_id
        message = (
            f"A prompt holds `{self.tokenizer.image_placeholder_token}`, the image placeholder, as text; it "
            f"is reserved for images. Write `{START_OF_IMAGE_PIECE}` where an image goes and pass the image."
        )
        if tf.executing_eagerly():
            if np.any(np.asarray(flat) == placeholder):
                raise ValueError(message)
        else:
            tf.debugging.assert_none_equal(flat, tf.cast(placeholder, flat.dtype), message=message)

    def _insert_placeholders(self, token_ids):
        """Puts `mm_tokens_per_image` placeholders after every `<start_of_image>` id."""
        ragged = isinstance(token_ids, tf.RaggedTensor)
        if not ragged:
            token_ids = tf.RaggedTensor.from_tensor(token_ids[None])
        flat = token_ids.flat_values
        is_start = tf.cast(tf.equal(flat, self.tokenizer.start_of_image_token_id), flat.dtype)
        copies = 1 + self.mm_tokens_per_image * is_start
        repeated = tf.repeat(flat, copies)
        block_start = tf.repeat(tf.cumsum(copies, exclusive=True), copies)
        within_block = tf.range(tf.shape(repeated, out_type=copies.dtype)[0]) - block_start
        placeholder = tf.cast(self.tokenizer.image_placeholder_token_id, flat.dtype)
        expanded = tf.where(within_block > 0, placeholder, repeated)
        # Summed per row (not per segment id): empty rows keep their place, at the end of a batch too.
        row_lengths = tf.reduce_sum(token_ids.with_flat_values(copies), axis=-1)
        result = tf.RaggedTensor.from_row_lengths(expanded, row_lengths)
        return result if ragged else result[0]

    def _check_images(self, encoder_token_ids, counts):
        """Exact per-sample counts for image lists; at most the slot count for arrays; none without images."""
        if not self._uses_images() or tf.is_tensor(counts):
            return
        if counts is None:
            if not tf.executing_eagerly():
                return
            counts = 0
        token_ids = np.asarray(encoder_token_ids)
        check_image_placeholders(
            token_ids.reshape(-1, token_ids.shape[-1]),
            counts,
            self.tokenizer.image_placeholder_token_id,
            self.mm_tokens_per_image,
        )

    @staticmethod
    def _split(x, y):
        """`(encoder_text, decoder_text or None, images or None)` from either input form, texts checked."""
        if isinstance(x, dict):
            if "encoder_text" not in x:
                raise ValueError(f"Expected a dict with `encoder_text`; got keys {sorted(x)}.")
            x, y, images = x["encoder_text"], x.get("decoder_text", y), x.get("images")
        else:
            images = None
        check_texts(x, "encoder_text")
        if y is not None:
            check_texts(y, "decoder_text")
        return x, y, images

    @staticmethod
    def _is_batched(text):
        if isinstance(text, (str, bytes)):
            return False
        if tf.is_tensor(text):
            return text.shape.rank == 1
        return True

    def _empty_images(self, token_ids):
        """Zero images, `max_images_per_prompt` (or no) slots per prompt of `token_ids`."""
        slots_and_size = [self.max_images_per_prompt or 0, *self.image_converter.image_size, 3]
        return tf.zeros(tf.concat([tf.shape(token_ids)[:-1], slots_and_size], 0))

    def call(
        self,
        x,
        y=None,
        sample_weight=None,
        *,
        encoder_sequence_length=None,
        decoder_sequence_length=None,
        sequence_length=None,
    ):
        encoder_text, decoder_text, images = self._split(x, y)
        if decoder_text is None:
            raise ValueError("Training needs targets: pass `decoder_text` in `x`, or target strings as `y`.")
        batched = self._is_batched(encoder_text)
        images, counts = self._images(images, batched)
        outputs = self._preprocess(
            self._pack(encoder_text, decoder_text, images),
            encoder_sequence_length=encoder_sequence_length or self.encoder_sequence_length,
            decoder_sequence_length=decoder_sequence_length or sequence_length or self.decoder_sequence_length,
        )
        self._check_images(outputs[0]["encoder_token_ids"], counts)
        return outputs

    @staticmethod
    def _pack(encoder_text, decoder_text, images):
        """One dict for `preprocessing_function`, which converts only its first argument."""
        packed = {"encoder_text": encoder_text, "decoder_text": decoder_text}
        if images is not None:
            packed["images"] = images
        return packed

    @preprocessing_function
    def _preprocess(self, x, encoder_sequence_length, decoder_sequence_length):
        images = x.get("images")
        encoder_token_ids, encoder_padding_mask = self.encoder_packer(
            self._expanded_prompts(x["encoder_text"]), sequence_length=encoder_sequence_length
        )
        decoder_token_ids, decoder_padding_mask = self.decoder_packer(
            self._tokenize(x["decoder_text"]), sequence_length=decoder_sequence_length + 1
        )
        x = {
            "encoder_token_ids": encoder_token_ids,
            "encoder_padding_mask": encoder_padding_mask,
            "decoder_token_ids": decoder_token_ids[..., :-1],
            "decoder_padding_mask": decoder_padding_mask[..., :-1],
        }
        if self.image_converter is not None:
            x["images"] = images if images is not None else self._empty_images(encoder_token_ids)
        return keras.utils.pack_x_y_sample_weight(x, decoder_token_ids[..., 1:], decoder_padding_mask[..., 1:])

    def generate_preprocess(
        self, x, *, encoder_sequence_length=None, decoder_sequence_length=None, sequence_length=None
    ):
        """Prompts to generation inputs; the decoder prompt gets `<bos>` and no `<eos>`.

        Raises:
            ValueError: if a prompt does not fit its sequence length, or
                image markers and images do not match.
        """
        if not self.built:
            self.build(None)  # not through `__call__`, which builds on first use
        encoder_text, decoder_text, images = self._split(x, None)
        batched = self._is_batched(encoder_text)
        if decoder_text is None:
            decoder_text = [""] * len(encoder_text) if batched else ""
        images, counts = self._images(images, batched)
        encoder_sequence_length = encoder_sequence_length or self.encoder_sequence_length
        decoder_sequence_length = decoder_sequence_length or sequence_length or self.decoder_sequence_length
        outputs = self._generate_inputs(
            self._pack(encoder_text, decoder_text, images),
            encoder_sequence_length=encoder_sequence_length,
            decoder_sequence_length=decoder_sequence_length,
        )
        self._check_images(outputs["encoder_token_ids"], counts)
        return outputs

    @preprocessing_function
    def _generate_inputs(self, x, encoder_sequence_length, decoder_sequence_length):
        images = x.get("images")
        encoder_token_ids = self._expanded_prompts(x["encoder_text"])
        decoder_token_ids = self._tokenize(x["decoder_text"])
        self._check_fits(
            encoder_token_ids, encoder_sequence_length, "encoder", self.add_start_token + self.add_end_token
        )
        self._check_fits(decoder_token_ids, decoder_sequence_length, "decoder", 1)
        encoder_token_ids, encoder_padding_mask = self.encoder_packer(
            encoder_token_ids, sequence_length=encoder_sequence_length
        )
        decoder_token_ids, decoder_padding_mask = self.decoder_packer(
            decoder_token_ids, sequence_length=decoder_sequence_length, add_end_value=False
        )
        inputs = {
            "encoder_token_ids": encoder_token_ids,
            "encoder_padding_mask": encoder_padding_mask,
            "decoder_token_ids": decoder_token_ids,
            "decoder_padding_mask": decoder_padding_mask,
        }
        if self.image_converter is not None:
            inputs["images"] = images if images is not None else self._empty_images(encoder_token_ids)
        return inputs

    def truncation(self, encoder_text, decoder_text=None, encoder_sequence_length=None, decoder_sequence_length=None):
        """A `TruncationReport` of what training on these texts cuts (eagerly; lists or arrays of strings).

        Counts the tokens each text becomes as `call` lays it out (images'
        placeholders, `<bos>`, `<eos>` included) against the sequence lengths
        (default: this preprocessor's).
        """
        if not self.built:
            self.build(None)
        encoder_sequence_length = encoder_sequence_length or self.encoder_sequence_length
        decoder_sequence_length = decoder_sequence_length or self.decoder_sequence_length
        encoder_text = [encoder_text] if isinstance(encoder_text, str) else list(encoder_text)
        decoder_text = (
            None if decoder_text is None else [decoder_text] if isinstance(decoder_text, str) else list(decoder_text)
        )

        def lengths(texts, tokenize):
            counts = []
            for start in range(0, len(texts), 1024):
                token_ids = tokenize(tf.constant(texts[start : start + 1024]))
                counts.append(np.asarray(token_ids.row_lengths()))
            return np.concatenate(counts) if counts else np.zeros([0], "int64")

        encoder = lengths(encoder_text, self._expanded_prompts) + self.add_start_token + self.add_end_token
        encoder_cuts = encoder[encoder > encoder_sequence_length] - encoder_sequence_length
        decoder_cuts = np.zeros([0], "int64")
        if decoder_text is not None:
            # `<bos>` + target + `<eos>`, packed to `decoder_sequence_length + 1` (inputs and labels share it).
            decoder = lengths(decoder_text, self._tokenize) + 2
            decoder_cuts = decoder[decoder > decoder_sequence_length + 1] - (decoder_sequence_length + 1)
        return TruncationReport(
            len(encoder_text), encoder_cuts, decoder_cuts, encoder_sequence_length, decoder_sequence_length
        )

    @staticmethod
    def _check_fits(token_ids, sequence_length, side, extra):
        if not tf.executing_eagerly():
            return
        lengths = token_ids.row_lengths() if isinstance(token_ids, tf.RaggedTensor) else [tf.shape(token_ids)[-1]]
        longest = int(tf.reduce_max(lengths)) + extra
        if longest > sequence_length:
            raise ValueError(
                f"A {side} prompt has {longest} tokens but the {side} sequence length is {sequence_length}. "
                f"Pass a larger `{side}_sequence_length` (or `max_length` for the decoder) or shorten it."
            )

    def get_config(self):
        size = self.image_size
        return {
            **super().get_config(),
            "encoder_sequence_length": self.encoder_sequence_length,
            "decoder_sequence_length": self.decoder_sequence_length,
            # KerasHub's names; its `image_size` is one side.
            "image_size": size[0] if size is not None and size[0] == size[1] else size,
            "num_vision_tokens_per_image": self.num_vision_tokens_per_image,
            "max_images_per_prompt": self.max_images_per_prompt,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }
