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


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Tokenizer(PresetMixin, SentencePieceTokenizer):
    """T5Gemma 2 tokenizer: SentencePiece with Gemma 3's special pieces.

    Checks that the vocabulary holds every piece the model relies on and
    exposes their ids: `pad_token_id` (`<pad>`, 0 in Gemma 3), `end_token_id`
    (`<eos>`, 1), `start_token_id` (`<bos>`, 2), `start_of_image_token_id`
    (`<start_of_image>`, 255999), `end_of_image_token_id` (`<end_of_image>`,
    256000) and `image_placeholder_token_id` (256001 in the released
    configs). In a prompt each image is `<start_of_image>`, one placeholder
    per image token, `<end_of_image>`; the image pieces must be user-defined
    pieces of the vocabulary for SentencePiece to find them in text.

    A scalar string gives a dense `(T,)` sequence, a batch of strings a
    ragged `(B, None)` one (dense `(B, sequence_length)` when
    `sequence_length` is set, padded with `pad_token_id`). Runs inside
    `tf.data` pipelines.

    Args:
        proto: bytes of a serialized SentencePiece `ModelProto`, or a path
            to a `tokenizer.model` file. `None` leaves the tokenizer empty
            until `load_assets()` (how presets restore it).
        image_placeholder: int or str, the image placeholder as an id
            (the model config's `image_token_index`) or as a piece.
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
    ```
    """

    backbone_cls = T5Gemma2Backbone

    def __init__(self, proto=None, image_placeholder=IMAGE_PLACEHOLDER_ID, **kwargs):
        if not isinstance(image_placeholder, (int, str)) or isinstance(image_placeholder, bool):
            raise ValueError(
                "`image_placeholder` must be a token id (int) or a piece (str). "
                f"Received: image_placeholder={image_placeholder!r}"
            )
        self.image_placeholder = image_placeholder
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        self._add_special_token(START_OF_IMAGE_PIECE, "start_of_image_token")
        self._add_special_token(END_OF_IMAGE_PIECE, "end_of_image_token")
        # An id is resolved to its piece once the vocabulary is set.
        piece = image_placeholder if isinstance(image_placeholder, str) else None
        self._add_special_token(piece, "image_placeholder_token")
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

    def _update_special_token_ids(self):
        if isinstance(self.image_placeholder, int):
            size = self.vocabulary_size()
            if not 0 <= self.image_placeholder < size:
                raise ValueError(
                    f"`image_placeholder` is id {self.image_placeholder}, outside the vocabulary of "
                    f"{size} pieces given to `{type(self).__name__}`."
                )
            self.image_placeholder_token = self.get_vocabulary()[self.image_placeholder]
        super()._update_special_token_ids()

    def get_config(self):
        config = super().get_config()
        config["image_placeholder"] = self.image_placeholder
        return config
