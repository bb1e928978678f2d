"""T5Gemma 2 token classification: one class per input token."""

import keras

from keras_t5gemma.models.classification import TokenClassifierTask
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_classification import t5gemma2_reference_states
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier_preprocessor import T5Gemma2TokenClassifierPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2TokenClassifier(TokenClassifierTask):
    """T5Gemma 2 with a classification head on every input token.

    Built as `transformers`' `T5Gemma2ForTokenClassification`: the encoder
    reads the input; the decoder reads the same ids shifted right behind
    `<bos>` (causal, no padding mask), so the decoder state at position `i`
    has read input tokens `< i` through its own attention and the whole
    input through the encoder; dropout and a projection to `num_classes` give
    the logits of token `i`.

    Inputs of the functional model (as the preprocessor gives them, or as
    the backbone's encoder takes them):
        encoder_token_ids, encoder_padding_mask: int `(B, S)`.
        images (vision models): float `(B, N, H, W, 3)`; may be left out.

    Output: logits `(B, S, num_classes)`.

    `fit`, `evaluate` and `predict` take words (see
    `T5Gemma2TokenClassifierPreprocessor`) with a preprocessor, or token-id
    dicts with `(B, S)` labels and `sample_weight` without one; padding and
    non-first word pieces carry no weight. `predict_words` gives one score
    row per word.

    Args:
        backbone: a `T5Gemma2Backbone` (with its decoder).
        num_classes: int.
        preprocessor: a `T5Gemma2TokenClassifierPreprocessor`, or `None`.
        dropout: float, before the projection (`classifier_dropout_rate`).
        labels: optional list of `num_classes` class names (`id2label`).
        start_token_id, pad_token_id: the decoder's start id and the padding
            id; default to the preprocessor's tokenizer's, else 2 and 0.
        activation: the projection's activation; `None` gives logits.
        train_vision_tower: bool, default `False`: `fit` leaves the vision
            tower and the end-of-image embedding frozen, as T5Gemma 2 is
            fine-tuned. See `T5Gemma2Task.train_vision_tower`.

    Example:
    ```python
    tagger = T5Gemma2TokenClassifier.from_preset("t5gemma2_tiny_digits", num_classes=2)
    tagger.preprocessor.sequence_length = 8
    # Tag each digit: 1 where it is larger than the one before.
    tagger.fit(x=["3 1 4 1", "1 2 3"], y=[[0, 0, 1, 0], [0, 1, 1]], batch_size=2)
    tagger.predict_words(["2 7 1"])[0].shape  # (3, 2): one row per word
    ```
    """

    backbone_cls = T5Gemma2Backbone
    preprocessor_cls = T5Gemma2TokenClassifierPreprocessor

    reference_states = staticmethod(t5gemma2_reference_states)
