"""Strings (and images) and class labels to `T5Gemma2TextClassifier` inputs."""

import keras

from keras_t5gemma.models.t5gemma2.t5gemma2_embedder_preprocessor import T5Gemma2EmbedderPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2TextClassifierPreprocessor(T5Gemma2EmbedderPreprocessor):
    """Prepares text, and text with images, for `T5Gemma2TextClassifier`.

    The classifier reads the encoder inputs only (it builds the decoder input
    from them, as the reference does), so the prompts are laid out exactly as
    for `T5Gemma2Embedder`: `<bos>` + text, `<start_of_image>` markers
    expanded to image blocks, right-padded to `sequence_length`. Labels `y`
    (class indices, `(B,)`) and `sample_weight` pass through unchanged.

    Accepted inputs are those of `T5Gemma2EmbedderPreprocessor` with text:
    strings, `{"text": ..., "images": ...}` dicts, lists of those, and string
    tensors inside `tf.data`.

    Outputs: `(x, y, sample_weight)` packed as Keras expects, `x` a dict with
    `encoder_token_ids`, `encoder_padding_mask` `(B, sequence_length)` and
    (vision models) `images` `(B, N, H, W, 3)`.

    Example:
    ```python
    preprocessor = T5Gemma2TextClassifierPreprocessor.from_preset(
        "t5gemma2_tiny_digits", sequence_length=16
    )
    x, y = preprocessor(["sort: 1 2 3", "sort: 3 1 2"], y=np.array([1, 0]))
    x["encoder_token_ids"].shape  # (2, 16)
    ```
    """
