"""Feed-forward blocks: gated GeLU for the text stacks, plain MLP for SigLIP."""

import math

import keras
from keras import ops

from keras_t5gemma.layers.blockwise_attention import feedforward_chunk
from keras_t5gemma.layers.projections import Dense
from keras_t5gemma.layers.projections import FusedEinsumDense


def gelu_tanh(x):
    return keras.activations.gelu(x, approximate=True)


class FeedForward(keras.layers.Layer):
    """`down(gelu(gate(x)) * up(x))` when gated, else `down(gelu(up(x)))`.

    The gate and up projections are one product (`gate_up`, kernel
    `(D, 2, I)`: the gate's `(D, I)` then the up projection's along axis 1),
    so a step runs one product where it ran two; each part is still a
    checkpoint tensor of its own to the converters (`WeightSpec.part`), and
    weights saved with the two separate layers load into it.

    Inputs of many tokens (more than `blockwise_settings`'
    `feedforward_tokens`, batch x length) run in chunks of that many tokens,
    one after another, so only a chunk's `(tokens, intermediate_dim)`
    activations are live (on JAX's CPU backend XLA also materialises the
    GeLU's constants at that shape); every token's result is the same.

    Args:
        intermediate_dim: int, width of the hidden layer.
        gated: bool, GeGLU (text) or plain two-layer MLP (vision).
        use_bias: bool.
        dropout: float, applied to the hidden activations.

    Example:
    >>> FeedForward(32)(keras.ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(self, intermediate_dim, gated=True, use_bias=False, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.gated = gated
        self.use_bias = use_bias
        self.dropout = dropout
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def _dense(self, name, units):
        return Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if self.gated:
            if self.use_bias:
                raise ValueError("A gated `FeedForward` has no biases (Gemma's MLP); `use_bias` is for the plain one.")
            # Saved before the fusion as two layers, `gate_dense` and `up_dense`: they load as its two parts.
            self.gate_up_dense = FusedEinsumDense(
                "btd,dci->btci",
                output_shape=(None, 2, self.intermediate_dim),
                parts=("gate_dense", "up_dense"),
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
                dtype=self.dtype_policy,
                name="gate_up",
            )
            self.gate_up_dense.build((None, None, hidden_dim))
        else:
            self.up_dense = self._dense("up", self.intermediate_dim)
            self.up_dense.build(input_shape)
        self.down_dense = self._dense("down", hidden_dim)
        self.down_dense.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, x, training=False):
        shape = tuple(x.shape)
        static = all(isinstance(size, int) for size in shape)
        chunk = feedforward_chunk(math.prod(shape[:-1])) if static else None
        # Chunks would draw other dropout masks than one piece does.
        if chunk is None or (training and self.dropout):
            return self._feed(x, training)
        tokens = math.prod(shape[:-1])
        rows = ops.reshape(x, (1, tokens, shape[-1]))
        # Unrolled: XLA runs one chunk after another (a loop op kept more live).
        fed = [self._feed(rows[:, start : start + chunk], training) for start in range(0, tokens, chunk)]
        return ops.reshape(ops.concatenate(fed, axis=1), shape)

    def _feed(self, x, training):
        """The block on `x` `(B, T, D)`."""
        if self.gated:
            gate_up = self.gate_up_dense(x)
            hidden = gelu_tanh(gate_up[:, :, 0]) * gate_up[:, :, 1]
        else:
            hidden = gelu_tanh(self.up_dense(x))
        hidden = self.dropout_layer(hidden, training=training)
        return self.down_dense(hidden)

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "gated": self.gated,
            "use_bias": self.use_bias,
            "dropout": self.dropout,
        }
