"""Strings and class labels to `T5GemmaTextClassifier` inputs."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_embedder_preprocessor import T5GemmaEmbedderPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaTextClassifierPreprocessor(T5GemmaEmbedderPreprocessor):
    """Prepares text for `T5GemmaTextClassifier` (text only).

    The classifier reads the encoder inputs only (it builds any decoder input
    from them, as the reference does), so texts are laid out as for
    `T5GemmaEmbedder`: `<bos>` + text, right-padded (and truncated) to
    `sequence_length`. Labels `y` (class indices, `(B,)`) and `sample_weight`
    pass through unchanged.

    Outputs: `(x, y, sample_weight)` packed as Keras expects, `x` a dict with
    `encoder_token_ids`, `encoder_padding_mask` `(B, sequence_length)`.

    Args:
        tokenizer: a `T5GemmaTokenizer`.
        sequence_length: int, padded length.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the text.

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
    preprocessor = T5GemmaTextClassifierPreprocessor(tokenizer, sequence_length=8)
    x, y = preprocessor(["The fox", "A fox slept."], y=np.array([1, 0]))
    x["encoder_token_ids"].shape  # (2, 8)
    ```
    """
