"""T5Gemma 2 tokenizer: Gemma 3's SentencePiece vocabulary and its special pieces."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.utils.preset_utils import PresetMixin

START_OF_IMAGE_PIECE = "<start_of_image>"
END_OF_IMAGE_PIECE = "<end_of_image>"
# The id of T5Gemma 2's image placeholder (`image_token_index` in the
# released configs); Gemma 3's vocabulary names that slot `<unused99>`.
IMAGE_PLACEHOLDER_ID = 256_001
# The placeholder's piece in KerasHub's and `transformers`' Gemma 3 prompts,
# looked for in vocabularies too small to hold `IMAGE_PLACEHOLDER_ID`.
IMAGE_PLACEHOLDER_PIECE = "<image_soft_token>"
_IMAGE_TOKENS = ("start_of_image_token", "end_of_image_token", "image_placeholder_token")


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Tokenizer(PresetMixin, SentencePieceTokenizer):
    """T5Gemma 2 tokenizer: SentencePiece with Gemma 3's special pieces.

    Checks that the vocabulary holds the pieces text needs and exposes their
    ids: `pad_token_id` (`<pad>`, 0 in Gemma 3), `end_token_id` (`<eos>`, 1)
    and `start_token_id` (`<bos>`, 2). The image pieces are optional, as in
    KerasHub's tokenizer: `start_of_image_token_id` (`<start_of_image>`,
    255999), `end_of_image_token_id` (`<end_of_image>`, 256000) and
    `image_placeholder_token_id` (256001 in the released configs) are `None`
    when the vocabulary lacks them, and `missing_image_tokens` names what
    is missing; the preprocessors then refuse images with that list. In a
    prompt each image is `<start_of_image>`, one placeholder per image token,
    `<end_of_image>`; the image pieces must be user-defined pieces of the
    vocabulary for SentencePiece to find them in text.

    A scalar string gives a dense `(T,)` sequence, a batch of strings a
    ragged `(B, None)` one (dense `(B, sequence_length)` when
    `sequence_length` is set, padded with `pad_token_id`). Runs inside
    `tf.data` pipelines.

    Args:
        proto: bytes of a serialized SentencePiece `ModelProto`, or a path
            to a `tokenizer.model` file (KerasHub's argument). `None` leaves
            the tokenizer empty until `load_assets()` (how presets restore it).
        image_placeholder: int or str, the image placeholder as an id (the
            model config's `image_token_index`) or as a piece; then the
            vocabulary must hold it and both image markers. `None` (the
            default) takes id 256001 when the vocabulary is that large
            (Gemma 3's), else the piece `<image_soft_token>` if there is one,
            else no placeholder: a text-only vocabulary.
        sequence_length, add_bos, add_eos, dtype: as in
            `keras_hub.tokenizers.SentencePieceTokenizer`.

    Example:
    ```python
    import io
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["The quick brown fox jumped.", "A fox slept."]),
        model_writer=model, model_type="bpe", vocab_size=60,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        user_defined_symbols=["<start_of_image>", "<end_of_image>", "<image>"],
        hard_vocab_limit=False,
    )
    tokenizer = T5Gemma2Tokenizer(model.getvalue(), image_placeholder="<image>")
    token_ids = tokenizer("The fox<start_of_image><image><end_of_image>")
    tokenizer.detokenize(token_ids)
    tokenizer.image_placeholder_token_id  # 6
    # Without `image_placeholder`, this vocabulary has no placeholder: text only.
    T5Gemma2Tokenizer(model.getvalue()).missing_image_tokens
    # ['the image placeholder (id 256001 or `<image_soft_token>`)']
    ```
    """

    backbone_cls = T5Gemma2Backbone

    def __init__(self, proto=None, image_placeholder=None, **kwargs):
        if image_placeholder is not None and (
            not isinstance(image_placeholder, (int, str)) or isinstance(image_placeholder, bool)
        ):
            raise ValueError(
                "`image_placeholder` must be a token id (int), a piece (str) or None. "
                f"Received: image_placeholder={image_placeholder!r}"
            )
        self.image_placeholder = image_placeholder
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        # The image pieces join the checked special tokens once the vocabulary
        # shows which are there (`_update_special_token_ids`).
        self.start_of_image_token, self.start_of_image_token_id = START_OF_IMAGE_PIECE, None
        self.end_of_image_token, self.end_of_image_token_id = END_OF_IMAGE_PIECE, None
        placeholder = image_placeholder if isinstance(image_placeholder, str) else IMAGE_PLACEHOLDER_PIECE
        self.image_placeholder_token, self.image_placeholder_token_id = placeholder, None
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        """KerasHub's `set_proto`; a file or bytes that are not a SentencePiece model get a `ValueError`."""
        try:
            super().set_proto(proto)
        except (ValueError, OSError):
            raise
        except Exception as error:  # TensorFlow's InternalError, SentencePiece's RuntimeError
            source = f"`{proto}`" if isinstance(proto, str) and len(proto) < 2048 else "The `proto` given"
            raise ValueError(f"{source} is not a SentencePiece model ({type(error).__name__}).") from None

    @property
    def missing_image_tokens(self):
        """The image pieces this vocabulary lacks, described for an error message (empty: images work)."""
        described = {
            "start_of_image_token": f"`{START_OF_IMAGE_PIECE}`",
            "end_of_image_token": f"`{END_OF_IMAGE_PIECE}`",
            "image_placeholder_token": (
                f"the image placeholder (`image_placeholder`={self.image_placeholder!r})"
                if self.image_placeholder is not None
                else f"the image placeholder (id {IMAGE_PLACEHOLDER_ID} or `{IMAGE_PLACEHOLDER_PIECE}`)"
            ),
        }
        return [text for name, text in described.items() if getattr(self, f"{name}_id") is None]

    def _update_special_token_ids(self):
        vocabulary = self.get_vocabulary()
        pieces = set(vocabulary)
        placeholder = self._placeholder_piece(vocabulary, pieces)
        # With an explicit placeholder every image piece is required (KerasHub's
        # check below names a missing one); otherwise each is used when there.
        required = self.image_placeholder is not None
        attributes = [name for name in self._special_token_attrs if name not in _IMAGE_TOKENS]
        for name, piece in zip(_IMAGE_TOKENS, (START_OF_IMAGE_PIECE, END_OF_IMAGE_PIECE, placeholder)):
            if piece is not None and (required or piece in pieces):
                setattr(self, name, piece)
                attributes.append(name)
            else:
                setattr(self, name, IMAGE_PLACEHOLDER_PIECE if piece is None else piece)
                setattr(self, f"{name}_id", None)
        self._special_token_attrs = attributes
        super()._update_special_token_ids()

    def _placeholder_piece(self, vocabulary, pieces):
        """The placeholder's piece in this vocabulary, or None for a text-only one."""
        placeholder = self.image_placeholder
        if isinstance(placeholder, str):
            return placeholder
        if isinstance(placeholder, int):
            if not 0 <= placeholder < len(vocabulary):
                raise ValueError(
                    f"`image_placeholder` is id {placeholder}, outside the vocabulary of "
                    f"{len(vocabulary)} pieces given to `{type(self).__name__}`."
                )
            return vocabulary[placeholder]
        if len(vocabulary) > IMAGE_PLACEHOLDER_ID:
            return vocabulary[IMAGE_PLACEHOLDER_ID]
        return IMAGE_PLACEHOLDER_PIECE if IMAGE_PLACEHOLDER_PIECE in pieces else None

    def get_config(self):
        config = super().get_config()
        config["image_placeholder"] = self.image_placeholder
        return config
