"""T5Gemma tokenizer: Gemma 2's SentencePiece vocabulary (256,000 pieces)."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.utils.preset_utils import PresetMixin


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaTokenizer(PresetMixin, SentencePieceTokenizer):
    """T5Gemma tokenizer: SentencePiece with Gemma 2's special pieces.

    Checks that the vocabulary holds `<pad>` (0 in Gemma 2), `<eos>` (1) and
    `<bos>` (2) and exposes their ids as `pad_token_id`, `end_token_id` and
    `start_token_id`. Text only: unlike `T5Gemma2Tokenizer` there are no
    image pieces. A scalar string gives a dense `(T,)` sequence, a batch of
    strings a ragged `(B, None)` one. Runs inside `tf.data` pipelines.

    Args:
        proto: bytes of a serialized SentencePiece `ModelProto`, or a path
            to a `tokenizer.model` file. `None` leaves the tokenizer empty
            until `load_assets()` (how presets restore it).
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
        hard_vocab_limit=False,
    )
    tokenizer = T5GemmaTokenizer(model.getvalue())
    tokenizer.detokenize(tokenizer("The fox"))
    ```
    """

    backbone_cls = T5GemmaBackbone

    def __init__(self, proto=None, **kwargs):
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)
