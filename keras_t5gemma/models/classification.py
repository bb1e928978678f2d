"""What the classifiers of both families share: the constructor, the head, label checks, loading, the two kinds.

The references (`T5Gemma2ForSequenceClassification`, `T5GemmaForSequenceClassification`
and their `...ForTokenClassification` in `transformers` 5.23) read a classifier's
input as encoder inputs (`input_ids`, `attention_mask`); where the full
encoder-decoder runs, the decoder reads the same ids shifted right behind
`<bos>`. Each family says which hidden states the head reads and where a
sequence is read (`reference_states`, a function of the backbone and the
encoder inputs); everything else is here:
- the head: dropout (`classifier_dropout_rate`), then a biased projection to
  `num_labels`;
- `SequenceClassifierTask`: the head at one position per input (the read
  position); `TokenClassifierTask`: at every position, fitted on words.
"""

import logging

import keras
import numpy as np
from keras import ops
from keras_hub.models import Task
from keras_hub.models import TextClassifier

from keras_t5gemma.models.task import T5Gemma2Task
from keras_t5gemma.models.task import is_model_input
from keras_t5gemma.models.task import saved_task_config
from keras_t5gemma.utils.keras_hub_compat import tf

logger = logging.getLogger("keras_t5gemma")

# The references' defaults: the decoder starts with `<bos>`, and `<pad>` is 0.
START_TOKEN_ID = 2
PAD_TOKEN_ID = 0
# The references initialise the projection with std `initializer_range / sqrt(num_labels)`.
INITIALIZER_RANGE = 0.02


def decoder_token_ids_from_encoder(encoder_token_ids, start_token_id):
    """`(B, S)` encoder ids -> the decoder ids the references build: `start_token_id`, then ids `[:-1]`."""
    start = ops.ones_like(encoder_token_ids[:, :1]) * start_token_id
    return ops.concatenate([start, encoder_token_ids[:, :-1]], axis=1)


def last_non_pad_position(token_ids, pad_token_id, shift=0):
    """`(B,)` index of the rightmost id that is not `pad_token_id` (0 when all are), plus `shift`.

    With `shift`, the index is kept below the sequence length (the
    references' clamp after a right shift).
    """
    # [batch, seq]: positions 0..S-1, zeroed at padding; the largest is the last real one.
    positions = ops.cumsum(ops.ones_like(token_ids), axis=1) - 1
    not_pad = ops.cast(ops.not_equal(token_ids, pad_token_id), positions.dtype)
    last = ops.argmax(positions * not_pad, axis=-1)
    if shift:
        last = ops.minimum(last + shift, ops.cast(ops.max(positions, axis=-1), last.dtype))
    return last


def encoder_inputs(backbone):
    """The functional inputs of a classifier: the backbone's encoder inputs."""
    inputs = {
        "encoder_token_ids": keras.Input((None,), dtype="int32", name="encoder_token_ids"),
        "encoder_padding_mask": keras.Input((None,), dtype="int32", name="encoder_padding_mask"),
    }
    if backbone.vision_encoder is not None:
        size = backbone.vision_encoder.image_size
        inputs["images"] = keras.Input((None, size, size, 3), name="images")
    return inputs


def check_labels(labels, num_classes, per_token):
    """Raises a `ValueError` naming the problem unless `labels` are class indices of the right shape.

    Sequence labels are `(B,)` (or `(B, 1)`); token labels `(B, S)`.
    """
    try:
        array = np.asarray(labels)
    except ValueError:
        raise ValueError(
            "Labels must be a rectangular array of class indices; got rows of different lengths."
        ) from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"Labels must be integer class indices; got values of type {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating) and np.any(array != np.round(array)):
        raise ValueError("Labels must be integer class indices; got fractional values.")
    if per_token and array.ndim != 2:
        raise ValueError(f"Token labels must have shape (batch, sequence_length); got shape {array.shape}.")
    if not per_token and not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
        raise ValueError(f"Labels must have shape (batch,), one class index per input; got shape {array.shape}.")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"Labels must be class indices in [0, {num_classes - 1}] for num_classes={num_classes}; "
            f"got values in [{array.min():g}, {array.max():g}]."
        )


# The arguments every classifier takes besides `backbone` and `preprocessor`.
CLASSIFIER_ARGUMENTS = (
    "num_classes",
    "dropout",
    "labels",
    "start_token_id",
    "pad_token_id",
    "activation",
    "train_vision_tower",
)


class ClassifierTask(T5Gemma2Task):
    """Base of every classifier: the constructor, head, label checks and `from_preset`.

    A family's classifier sets `backbone_cls`, `preprocessor_cls` and
    `reference_states`, a static function
    `(backbone, inputs, start_token_id, pad_token_id) -> (hidden, read_position)`:
    the hidden states `(B, S, D)` the head reads and the `(B,)` position a
    sequence classifier reads. `SequenceClassifierTask` and
    `TokenClassifierTask` say which of the two the head takes.

    Args:
        backbone: the family's backbone.
        num_classes: int.
        preprocessor: the classifier's preprocessor, or `None`.
        dropout: float, before the projection (the reference's
            `classifier_dropout_rate`).
        labels: optional list of `num_classes` class names (`id2label`).
        start_token_id, pad_token_id: the decoder's start id and the padding
            id; default to the preprocessor's tokenizer's, else 2 and 0.
        activation: the projection's activation; `None` gives logits.
        train_vision_tower: bool, default `False`: `fit` leaves a vision
            tower and the end-of-image embedding frozen (see
            `T5Gemma2Task.train_vision_tower`).
        head_dtype: the head's dtype policy (serialized); set by
            `get_config` once `quantize` has converted the head, so that a
            saved quantized classifier is rebuilt with a quantized head.
            Default: the backbone's float policy.
    """

    per_token = False
    reference_states = None

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
        head_dtype=None,
        **kwargs,
    ):
        self._head_dtype = head_dtype
        self._configure(backbone, preprocessor, num_classes, dropout, labels, start_token_id, pad_token_id, activation)

        # === Functional model ===
        inputs = encoder_inputs(backbone)
        hidden, read_position = self.reference_states(backbone, inputs, self.start_token_id, self.pad_token_id)
        super().__init__(inputs=inputs, outputs=self._head(self._read(hidden, read_position)), **kwargs)

        # === Config ===
        self.train_vision_tower = train_vision_tower

    def _read(self, hidden, read_position):
        """What the head takes of `hidden` `(B, S, D)`: a subclass's choice."""
        raise NotImplementedError

    def _configure(
        self, backbone, preprocessor, num_classes, dropout, labels, start_token_id, pad_token_id, activation
    ):
        """Checks the arguments and sets the backbone, preprocessor and head settings."""
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer; got {num_classes!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout}.")
        if labels is not None:
            labels = [str(label) for label in labels]
            if len(labels) != num_classes:
                raise ValueError(f"`labels` names {len(labels)} classes but `num_classes` is {num_classes}.")
        tokenizer = getattr(preprocessor, "tokenizer", None)
        if start_token_id is None:
            start_token_id = START_TOKEN_ID if tokenizer is None else tokenizer.start_token_id
        if pad_token_id is None:
            pad_token_id = PAD_TOKEN_ID if tokenizer is None else tokenizer.pad_token_id
        self.num_classes = num_classes
        self.dropout = dropout
        self.labels = labels
        self.start_token_id = int(start_token_id)
        self.pad_token_id = int(pad_token_id)
        self.activation = keras.activations.serialize(keras.activations.get(activation))

    def _head(self, hidden):
        """Dropout, then the projection to `num_classes` (with `activation`, by default none)."""
        self.output_dropout = keras.layers.Dropout(self.dropout, name="output_dropout")
        policy = self.backbone.dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            # A backbone loaded quantized maps its layers' paths to policies; the head gets the float one.
            policy = policy.default_policy
        if self._head_dtype is not None:
            policy = keras.dtype_policies.deserialize(self._head_dtype)
        self.output_dense = keras.layers.Dense(
            self.num_classes,
            activation=keras.activations.deserialize(self.activation),
            kernel_initializer=keras.initializers.RandomNormal(stddev=INITIALIZER_RANGE * self.num_classes**-0.5),
            dtype=policy,
            name="logits",
        )
        return self.output_dense(self.output_dropout(hidden))

    # === Training with label checks ===

    def _check_labels(self, y):
        if y is None or isinstance(y, tf.data.Dataset) or isinstance(y, keras.utils.PyDataset):
            return
        check_labels(y, self.num_classes, self.per_token)

    def fit(self, x=None, y=None, *args, **kwargs):
        """Keras `fit`; labels given as arrays are checked first (class indices, shape)."""
        self._check_labels(y)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """Keras `evaluate`; labels given as arrays are checked first."""
        self._check_labels(y)
        return super().evaluate(x, y, *args, **kwargs)

    def get_config(self):
        config = {**super().get_config(), **{name: getattr(self, name) for name in CLASSIFIER_ARGUMENTS}}
        if self.output_dense.quantization_mode is not None:
            config["head_dtype"] = keras.dtype_policies.serialize(self.output_dense.dtype_policy)
        return config

    @classmethod
    def load_preset(cls, loader, load_weights=True, **kwargs):
        """`from_preset`: the backbone and preprocessor of any preset of the family, and a head.

        A Keras preset saved from this class restores its head unless
        `num_classes` is given; other presets (a sequence-to-sequence task, a
        backbone) need `num_classes` and get a new head. Hugging Face
        classification checkpoints bring their head (`num_labels`,
        `id2label` as `labels`, `classifier_dropout_rate`). Pass
        `preprocessor=None` for a preset without tokenizer files.
        """
        load_task_weights = "num_classes" not in kwargs
        saved = bool(saved_task_config(loader, cls))
        # A Hugging Face loader says whether its checkpoint holds a classification head.
        has_head = saved or getattr(loader, "has_classifier_head", lambda: False)()
        if not saved and "preprocessor" not in kwargs:
            text_only = {"image_converter": None} if kwargs.get("text_only") else {}
            kwargs["preprocessor"] = cls.preprocessor_cls.load_preset(loader, **text_only)
        if not has_head and "num_classes" not in kwargs:
            raise ValueError(
                f"`{cls.__name__}.from_preset` of a preset without a classification head needs "
                "`num_classes`, e.g. `from_preset(preset, num_classes=2)`."
            )
        task = loader.load_task(cls, load_weights, load_task_weights, **kwargs)
        if not (has_head and load_task_weights):
            logger.warning(
                "%s: the preset has no classification head to load; a new %d-class head is randomly "
                "initialised and needs training.",
                cls.__name__,
                task.num_classes,
            )
        return task


class SequenceClassifierTask(ClassifierTask, TextClassifier):
    """A classifier of whole inputs: the head reads the hidden state at the read position.

    Output: logits `(B, num_classes)` (or probabilities with
    `activation="softmax"`).
    """

    def _read(self, hidden, read_position):
        # [batch, hidden_dim]
        return ops.take_along_axis(hidden, read_position[:, None, None], axis=1)[:, 0]

    def predict(self, x=None, batch_size=None, **kwargs):
        """Scores `(B, num_classes)`, one row per input in order.

        Strings, `{"text": ..., "images": ...}` dicts (images of any sizes)
        and lists of those are preprocessed in batches of `batch_size`
        (default 32); model inputs and datasets go to Keras' `predict`.
        """
        if self.preprocessor is None or is_model_input(x) or isinstance(x, tf.data.Dataset) or tf.is_tensor(x):
            return super().predict(x, batch_size=batch_size, **kwargs)
        samples = [{"text": text, "images": images} for text, images in self.preprocessor.as_samples(x)]
        return self.predict_samples(samples, batch_size or 32)


class TokenClassifierTask(ClassifierTask, Task):
    """A classifier of every input token: the head reads every hidden state.

    Output: logits `(B, S, num_classes)`. `fit`, `evaluate` and `predict`
    take words (see the token classifier preprocessors) with a preprocessor,
    or token-id dicts with `(B, S)` labels and `sample_weight` without one;
    padding and non-first word pieces carry no weight. `predict_words`
    gives one score row per word.
    """

    per_token = True

    def _read(self, hidden, read_position):
        return hidden

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
