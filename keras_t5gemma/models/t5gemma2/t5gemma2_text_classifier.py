"""T5Gemma 2 sequence classification: one class per input, read where the reference reads it."""

import keras

from keras_t5gemma.models.classification import SequenceClassifierTask
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_classification import t5gemma2_reference_states
from keras_t5gemma.models.t5gemma2.t5gemma2_text_classifier_preprocessor import T5Gemma2TextClassifierPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2TextClassifier(SequenceClassifierTask):
    """T5Gemma 2 with a classification head: one label per input (text, or text with images).

    Built as `transformers`' `T5Gemma2ForSequenceClassification`: the encoder
    reads the input; the decoder reads the same ids shifted right behind
    `<bos>` (causal, no padding mask); dropout and a projection to
    `num_classes` are applied to the decoder state at the last position whose
    decoder input is not `<pad>` (the position that has read the whole
    input, for left and right padding alike).

    Inputs of the functional model (as the preprocessor gives them, or as
    the backbone's encoder takes them):
        encoder_token_ids, encoder_padding_mask: int `(B, S)`.
        images (vision models): float `(B, N, H, W, 3)`; may be left out.

    Output: logits `(B, num_classes)` (or probabilities with
    `activation="softmax"`).

    Args:
        backbone: a `T5Gemma2Backbone` (with its decoder).
        num_classes: int.
        preprocessor: a `T5Gemma2TextClassifierPreprocessor`, or `None`.
        dropout: float, before the projection (the reference's
            `classifier_dropout_rate`).
        labels: optional list of `num_classes` class names (`id2label`).
        start_token_id, pad_token_id: the decoder's start id and the padding
            id; default to the preprocessor's tokenizer's, else 2 and 0.
        activation: the projection's activation; `None` gives logits.
        train_vision_tower: bool, default `False`: `fit` leaves the vision
            tower and the end-of-image embedding frozen, as T5Gemma 2 is
            fine-tuned. See `T5Gemma2Task.train_vision_tower`.

    Example:
    ```python
    classifier = T5Gemma2TextClassifier.from_preset("t5gemma2_tiny_digits", num_classes=2)
    classifier.preprocessor.sequence_length = 16
    classifier.fit(x=["sort: 1 2 3", "sort: 3 1 2"], y=np.array([1, 0]), batch_size=2)
    scores = classifier.predict(["sort: 2 3 4"])  # (1, 2) logits
    ```
    """

    backbone_cls = T5Gemma2Backbone
    preprocessor_cls = T5Gemma2TextClassifierPreprocessor

    reference_states = staticmethod(t5gemma2_reference_states)
