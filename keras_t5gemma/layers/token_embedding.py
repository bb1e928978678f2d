"""The token embedding shared by the encoder input, decoder input and LM head."""

import math

import keras
from keras import ops

from keras_t5gemma.layers.projections import ReversibleEmbedding


class TokenEmbedding(keras.layers.Layer):
    """Scaled token embedding, optionally with a learned end-of-image vector; tied LM head.

    T5Gemma 2 ties one table across the encoder input, the decoder input and
    the output projection; T5Gemma (the first generation) gives the encoder
    its own table and ties the decoder's to the output projection, with no
    end-of-image vector. Looked-up rows are multiplied by `sqrt(hidden_dim)`
    (rounded to the compute dtype first, as the reference does), then rows of
    the end-of-image token are replaced by `eoi_embedding`, which is not scaled.

    The table is a `keras.layers.ReversibleEmbedding`, so `quantize("int8")`
    reaches it and the output projection.

    Args:
        vocabulary_size: int.
        hidden_dim: int.
        eoi_token_id: int, the end-of-image token, or `None` for no
            end-of-image vector.
        logit_soft_cap: optional float, `cap * tanh(logits / cap)` on logits.

    Example:
    >>> embedding = TokenEmbedding(vocabulary_size=10, hidden_dim=4, eoi_token_id=9)
    >>> hidden = embedding(keras.ops.array([[1, 2, 9]]))
    >>> embedding.logits(hidden).shape
    (1, 3, 10)
    """

    def __init__(self, vocabulary_size, hidden_dim, eoi_token_id, logit_soft_cap=None, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.eoi_token_id = eoi_token_id
        self.logit_soft_cap = logit_soft_cap
        self.table = ReversibleEmbedding(
            vocabulary_size,
            hidden_dim,
            tie_weights=True,
            logit_soft_cap=logit_soft_cap,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=self.dtype_policy,
            name="table",
        )

    def build(self, input_shape=None):
        self.table.build()
        if self.eoi_token_id is not None:
            self.eoi_embedding = self.add_weight(name="eoi_embedding", shape=(self.hidden_dim,), initializer="zeros")
        self.built = True

    def call(self, token_ids):
        """`(B, T)` ids to `(B, T, D)` embeddings."""
        scale = ops.cast(ops.convert_to_tensor(math.sqrt(self.hidden_dim), "float32"), self.compute_dtype)
        rows = self.table(token_ids) * scale
        if self.eoi_token_id is None:
            return rows
        is_eoi = ops.equal(token_ids, self.eoi_token_id)[..., None]
        return ops.where(is_eoi, ops.cast(self.eoi_embedding, self.compute_dtype), rows)

    def logits(self, hidden):
        """`(..., D)` hidden states to `(..., vocabulary_size)` logits."""
        return self.table(hidden, reverse=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.hidden_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim,
            "eoi_token_id": self.eoi_token_id,
            "logit_soft_cap": self.logit_soft_cap,
        }
