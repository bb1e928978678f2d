"""T5Gemma 2 token classification: one class per input token."""

import keras
import numpy as np
from keras_hub.models import Task

from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_classification import T5Gemma2Classifier
from keras_t5gemma.models.t5gemma2.t5gemma2_classification import encoder_inputs
from keras_t5gemma.models.t5gemma2.t5gemma2_classification import reference_decoder_states
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier_preprocessor import T5Gemma2TokenClassifierPreprocessor
from keras_t5gemma.models.task import is_model_input
from keras_t5gemma.utils.keras_hub_compat import tf


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2TokenClassifier(T5Gemma2Classifier, Task):
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
    per_token = True

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        dropout=0.0,
        labels=None,
        start_token_id=None,
        pad_token_id=None,
        activation=None,
        train_vision_tower=False,
        **kwargs,
    ):
        self._configure(backbone, preprocessor, num_classes, dropout, labels, start_token_id, pad_token_id, activation)

        # === Functional model ===
        inputs = encoder_inputs(backbone)
        # [batch, seq, hidden_dim]
        _, hidden = reference_decoder_states(backbone, inputs, self.start_token_id)
        super().__init__(inputs=inputs, outputs=self._head(hidden), **kwargs)

        # === Config ===
        self.train_vision_tower = train_vision_tower

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", **kwargs):
        """Keras `compile` with defaults: Adam(5e-5), sparse cross-entropy, token accuracy.

        The accuracy is a weighted metric, so that only scored tokens (each
        word's first token) count.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(5e-5)
        if loss == "auto":
            from_logits = keras.activations.get(self.activation) != keras.activations.softmax
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)

    # === Python input runs through the preprocessor first ===

    def _eager_inputs(self, x):
        return (
            self.preprocessor is not None
            and not isinstance(x, (tf.data.Dataset, keras.utils.PyDataset))
            and not is_model_input(x)
        )

    def _preprocessed(self, x, y, sample_weight):
        """`(x, y, sample_weight)` ready for the model, labels checked."""
        if self._eager_inputs(x):
            if y is None:
                return self.preprocessor(x), None, None
            x, y, sample_weight = self.preprocessor(x, y, sample_weight)
        self._check_labels(y)
        return x, y, sample_weight

    def fit(self, x=None, y=None, batch_size=None, epochs=1, sample_weight=None, **kwargs):
        """Keras `fit` on words and per-word labels (preprocessed first), or on token-id dicts."""
        x, y, sample_weight = self._preprocessed(x, y, sample_weight)
        return super().fit(x, y, batch_size=batch_size, epochs=epochs, sample_weight=sample_weight, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """Keras `evaluate` on words and per-word labels, or on token-id dicts."""
        x, y, sample_weight = self._preprocessed(x, y, sample_weight)
        return super().evaluate(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        """Token scores `(B, S, num_classes)` for words (preprocessed first) or token-id dicts."""
        x = self._preprocessed(x, None, None)[0]
        return super().predict(x, batch_size=batch_size, **kwargs)

    def predict_words(self, x, batch_size=None, **kwargs):
        """Per sample, a `(words, num_classes)` array: the scores of each word's first token.

        Words cut off by the preprocessor's `sequence_length` get no row.
        """
        if self.preprocessor is None:
            raise ValueError("`predict_words` needs a preprocessor to split the input into words.")
        scores = self.predict(x, batch_size=batch_size, **kwargs)
        positions = self.preprocessor.first_token_positions(x)
        return [np.asarray(row[index]) for row, index in zip(scores, positions)]
