"""Contrastive training of an embedder on (query, positive) pairs with in-batch negatives.

An example model built on the library (`examples/contrastive_finetune.py` trains one); not part of
the `keras_t5gemma` package.
"""

import keras
from keras import ops

from keras_t5gemma.utils.keras_hub_compat import PipelineModel


def in_batch_softmax_loss(similarity_logits):
    """InfoNCE with in-batch negatives, from `(B, B)` query-by-positive logits.

    Row i scores query i against every positive of the batch; its own
    positive (the diagonal) is the target class, the others are negatives.
    Returns the mean cross-entropy, a scalar.
    """
    labels = ops.arange(ops.shape(similarity_logits)[0], dtype="int32")
    losses = keras.losses.sparse_categorical_crossentropy(labels, similarity_logits, from_logits=True)
    return ops.mean(losses)


@keras.saving.register_keras_serializable(package="keras_t5gemma_examples")
class ContrastivePairModel(PipelineModel):
    """Trains an embedder with InfoNCE on `(query, positive)` pairs.

    The model embeds both sides with the same embedder and outputs the
    `(B, B)` matrix of similarities `query_i . positive_j / temperature`;
    `fit` minimises the cross-entropy of each query's row against its own
    positive, the other positives of the batch being its negatives (so a
    larger batch gives more negatives). Use an embedder with
    `normalize=True`, which makes the similarities cosines. `y` and
    `sample_weight` are not used; every pair counts the same.

    Inputs: `{"query": ..., "positive": ...}`, each side as the embedder
    takes it (strings when the embedder has a preprocessor, which
    `fit`/`evaluate`/`predict` apply).

    Args:
        embedder: a model from inputs to `(B, D)` vectors with a
            `preprocessor` attribute, e.g. `T5Gemma2Embedder`.
        temperature: float, the softmax temperature.

    Example:
    ```python
    embedder = T5Gemma2Embedder.from_preset("t5gemma2_270m_270m", text_only=True)
    embedder.preprocessor.sequence_length = 64
    pairs = ContrastivePairModel(embedder, temperature=0.05)
    pairs.compile(optimizer=keras.optimizers.Adam(1e-5))
    pairs.fit({"query": ["capital of France?"], "positive": ["Paris is the capital of France."]},
              batch_size=1)
    ```
    """

    def __init__(self, embedder, temperature=0.05, **kwargs):
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive; got {temperature}.")
        # === Functional model ===
        # Functional like the embedder: KerasHub's pipeline models must not mix
        # functional and subclassed models in one process.
        inputs = {
            side: {
                key: keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=f"{side}_{key}")
                for key, tensor in embedder.input.items()
            }
            for side in ("query", "positive")
        }
        query = embedder(inputs["query"])
        positive = embedder(inputs["positive"])
        logits = ops.matmul(query, ops.transpose(positive)) / temperature
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

        # === Layers and config ===
        # Set after the functional init, which torch needs before assigning modules.
        self.embedder = embedder
        self.temperature = temperature

    def preprocess_samples(self, x, y=None, sample_weight=None):
        preprocessor = getattr(self.embedder, "preprocessor", None)
        if preprocessor is not None:
            x = {side: preprocessor(x[side]) for side in ("query", "positive")}
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = in_batch_softmax_loss(y_pred)
        # Regularisation losses of the embedder, if any; a compiled `loss` is not used.
        for extra in self.losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return loss

    def get_config(self):
        # Not the nested functional config: the constructor's arguments.
        return {
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "temperature": self.temperature,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = {**config, "embedder": keras.saving.deserialize_keras_object(config["embedder"])}
        return cls(**config)
