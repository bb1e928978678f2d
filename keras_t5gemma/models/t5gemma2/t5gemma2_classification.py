"""What the two T5Gemma 2 classifiers share: the reference's decoder inputs, the head, label checks, loading.

The reference (`T5Gemma2ForSequenceClassification`, `...ForTokenClassification`
in `transformers` 5.23) always runs the full encoder-decoder; T5Gemma 2 has no
encoder-only classification form. From `input_ids` and `attention_mask` it
builds:
- the encoder input: `input_ids` with `attention_mask` (and the images);
- the decoder input: `input_ids` shifted right by one, `<bos>` (the decoder's
  `bos_token_id`) first, with no decoder padding mask (causal attention only);
- the head: dropout (`classifier_dropout_rate`), then a biased projection to
  `num_labels`, on the decoder's final hidden states.
The sequence classifier reads the head at the last decoder position whose
input id is not `pad_token_id`; the token classifier at every position.
"""

import logging

import keras
import numpy as np
from keras import ops

from keras_t5gemma.models.task import T5Gemma2Task
from keras_t5gemma.models.task import saved_task_config
from keras_t5gemma.utils.keras_hub_compat import tf

logger = logging.getLogger("keras_t5gemma")

# The reference's defaults (`T5Gemma2Config`): the decoder starts with `<bos>`, and `<pad>` is 0.
START_TOKEN_ID = 2
PAD_TOKEN_ID = 0
# The reference initialises the projection with std `initializer_range / sqrt(num_labels)`.
INITIALIZER_RANGE = 0.02


def decoder_token_ids_from_encoder(encoder_token_ids, start_token_id):
    """`(B, S)` encoder ids -> the decoder ids the reference builds: `start_token_id`, then ids `[:-1]`."""
    start = ops.ones_like(encoder_token_ids[:, :1]) * start_token_id
    return ops.concatenate([start, encoder_token_ids[:, :-1]], axis=1)


def last_non_pad_position(token_ids, pad_token_id):
    """`(B,)` index of the rightmost id that is not `pad_token_id` (0 when all are)."""
    # [batch, seq]: positions 0..S-1, zeroed at padding; the largest is the last real one.
    positions = ops.cumsum(ops.ones_like(token_ids), axis=1) - 1
    not_pad = ops.cast(ops.not_equal(token_ids, pad_token_id), positions.dtype)
    return ops.argmax(positions * not_pad, axis=-1)


def reference_decoder_states(backbone, inputs, start_token_id):
    """`(decoder_token_ids, decoder hidden states (B, S, D))` for the backbone's encoder inputs."""
    encoder_token_ids = inputs["encoder_token_ids"]
    decoder_token_ids = decoder_token_ids_from_encoder(encoder_token_ids, start_token_id)
    outputs = backbone(
        {
            **inputs,
            "decoder_token_ids": decoder_token_ids,
            # No decoder padding mask: the reference passes none, so attention is causal only.
            "decoder_padding_mask": ops.ones_like(decoder_token_ids),
        }
    )
    return decoder_token_ids, outputs["decoder_sequence_output"]


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


# The arguments both classifiers take besides `backbone` and `preprocessor`.
CLASSIFIER_ARGUMENTS = (
    "num_classes",
    "dropout",
    "labels",
    "start_token_id",
    "pad_token_id",
    "activation",
    "train_vision_tower",
)


class T5Gemma2Classifier(T5Gemma2Task):
    """Base of the T5Gemma 2 classifiers: arguments, head, label checks and `from_preset`.

    A subclass sets `per_token` (bool), calls `_configure` (before building
    anything) and `_head` in its `__init__`, and may add KerasHub's kind of
    task as its second base.
    """

    per_token = False

    def _configure(
        self, backbone, preprocessor, num_classes, dropout, labels, start_token_id, pad_token_id, activation
    ):
        """Checks the arguments and sets the backbone, preprocessor and head settings."""
        if backbone.decoder is None:
            raise ValueError("The classifier runs the decoder, as the reference does; this backbone is encoder-only.")
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
        return {**super().get_config(), **{name: getattr(self, name) for name in CLASSIFIER_ARGUMENTS}}

    @classmethod
    def load_preset(cls, loader, load_weights=True, **kwargs):
        """`from_preset`: the backbone and preprocessor of any T5Gemma 2 preset, and a head.

        A Keras preset saved from this class restores its head unless
        `num_classes` is given; other presets (a `T5Gemma2Seq2SeqLM`, a
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
