"""Grouped-query attention shared by the encoder, the decoder and the vision tower.

Shape letters: B batch, T queries, S keys, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head size, D model width.
"""

import keras
from keras import ops

from keras_t5gemma.layers.blockwise_attention import blockwise_attention
from keras_t5gemma.layers.blockwise_attention import use_blockwise
from keras_t5gemma.layers.masks import MASKED_LOGIT
from keras_t5gemma.layers.masks import AttentionMask
from keras_t5gemma.layers.normalization import RMSNormalization
from keras_t5gemma.layers.projections import EinsumDense
from keras_t5gemma.layers.projections import FusedEinsumDense
from keras_t5gemma.layers.rotary import apply_rotary


def grouped_attention(query, key, value, mask, scale, soft_cap=None, dropout=None, training=False):
    """Softmax attention with query heads grouped over shared key/value heads.

    The dense path: logits `(B, N, T, S)` in one piece. Long text inputs go
    through `blockwise_attention` instead (see `Attention.call`).

    Args:
        query: `(B, T, N, H)`.
        key, value: `(B, S, K, H)` with `N % K == 0`.
        mask: bool, broadcastable to `(B, T, S)`; `True` may attend. `None`
            attends everywhere.
        scale: float multiplied into the logits.
        soft_cap: optional float; logits become `cap * tanh(logits / cap)`.
        dropout: optional `keras.layers.Dropout` applied to the probabilities.

    Returns:
        `(B, T, N, H)` in the query dtype. Logits and softmax are float32.
    """
    if keras.config.backend() == "jax" and soft_cap is None and (dropout is None or not training):
        # JAX's fused attention: the same arithmetic (logits and softmax in
        # float32, for bfloat16 inputs too), 10-30% faster on CPU, and cuDNN
        # or Pallas kernels where the platform has them. (TensorFlow's lacks
        # grouped key/value heads; torch's gives NaN for fully masked rows.)
        if mask is not None:
            mask = ops.cast(mask, "bool")[:, None, :, :]
        return ops.dot_product_attention(query, key, value, mask=mask, scale=scale)
    batch, length, num_heads, head_dim = ops.shape(query)
    num_kv_heads = ops.shape(key)[2]
    grouped = ops.reshape(query, (batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim))
    logits = ops.einsum("btkgh,bskh->bkgts", grouped, key)
    logits = ops.cast(logits, "float32") * scale
    if soft_cap is not None:
        logits = ops.tanh(logits / soft_cap) * soft_cap
    if mask is not None:
        mask = ops.cast(mask, "bool")[:, None, None, :, :]
        logits = ops.where(mask, logits, MASKED_LOGIT)
    probabilities = ops.cast(ops.softmax(logits, axis=-1), query.dtype)
    if dropout is not None:
        probabilities = dropout(probabilities, training=training)
    output = ops.einsum("bkgts,bskh->btkgh", probabilities, value)
    return ops.reshape(output, (batch, length, num_heads, head_dim))


class Attention(keras.layers.Layer):
    """Multi-head attention with grouped key/value heads.

    The text encoder uses it with q/k RMSNorm, RoPE and a bidirectional mask;
    the T5Gemma 2 decoder adds encoder keys/values after its own (merged
    self+cross attention, one softmax); the T5Gemma decoder's separate
    cross-attention block attends to encoder keys/values only (`key_value`,
    projected from the encoder's width `key_value_dim`); the vision tower uses
    biases and no RoPE.

    A layer that projects its keys and values from its own input (no
    `key_value_dim`) computes queries, keys and values as one product: the
    kernel `query_key_value` is `(D, N + 2K, H)`, the query heads then the key
    heads then the value heads (a step runs one product where it ran three;
    each part is still a checkpoint tensor of its own to the converters, and
    weights saved with the three layers load into it). A cross-attention block
    keeps `query`, `key` and `value` apart, since its queries and keys read
    different inputs.

    Args:
        num_heads: int, query heads N.
        num_key_value_heads: int, key/value heads K; N must be a multiple.
        head_dim: int, H.
        query_scale: float multiplied into the attention logits.
        use_bias: bool, biases on the projections (vision tower).
        use_query_key_norm: bool, RMSNorm over H on queries and keys.
        layer_norm_epsilon: float, for the q/k norms.
        soft_cap: optional attention-logit soft cap.
        dropout: float, dropout on the attention probabilities.
        key_value_dim: optional int, set for a cross-attention block: the
            width its keys and values project from (the encoder's), given to
            `call` as `key_value`. Default: keys and values of the input.

    Example:
    >>> attention = Attention(num_heads=4, num_key_value_heads=2, head_dim=8, query_scale=8**-0.5)
    >>> x = keras.ops.ones((2, 5, 16))
    >>> attention(x, attention_mask=keras.ops.ones((1, 5, 5), "bool")).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        num_heads,
        num_key_value_heads,
        head_dim,
        query_scale,
        use_bias=False,
        use_query_key_norm=True,
        layer_norm_epsilon=1e-6,
        soft_cap=None,
        dropout=0.0,
        key_value_dim=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_heads % num_key_value_heads:
            raise ValueError(
                f"`num_heads` ({num_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})."
            )
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.use_bias = use_bias
        self.use_query_key_norm = use_query_key_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.soft_cap = soft_cap
        self.dropout = dropout
        self.key_value_dim = key_value_dim

        def projection(name, equation, output_shape, bias_axes, layer=EinsumDense, **kwargs):
            return layer(
                equation,
                output_shape=output_shape,
                bias_axes=bias_axes if use_bias else None,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
                dtype=self.dtype_policy,
                name=name,
                **kwargs,
            )

        if key_value_dim is None:
            # Saved before the fusion as three layers, `query_dense`, `key_dense` and `value_dense`: they
            # load as its parts.
            self.query_key_value_dense = projection(
                "query_key_value",
                "btd,dnh->btnh",
                (None, num_heads + 2 * num_key_value_heads, head_dim),
                "nh",
                layer=FusedEinsumDense,
                parts=("query_dense", "key_dense", "value_dense"),
                part_sizes=(num_heads, num_key_value_heads, num_key_value_heads),
            )
        else:
            self.query_dense = projection("query", "btd,dnh->btnh", (None, num_heads, head_dim), "nh")
            self.key_dense = projection("key", "bsd,dkh->bskh", (None, num_key_value_heads, head_dim), "kh")
            self.value_dense = projection("value", "bsd,dkh->bskh", (None, num_key_value_heads, head_dim), "kh")
        if use_query_key_norm:
            self.query_norm = RMSNormalization(layer_norm_epsilon, dtype=self.dtype_policy, name="query_norm")
            self.key_norm = RMSNormalization(layer_norm_epsilon, dtype=self.dtype_policy, name="key_norm")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy) if dropout else None

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        # Label order matters to `jnp.einsum`: it contracts labels in
        # alphabetical order, and "nh" would transpose (copy) the kernel on
        # every call; "nv" keeps the contraction in memory order.
        self.output_dense = EinsumDense(
            "btnv,nvd->btd",
            output_shape=(None, hidden_dim),
            bias_axes="d" if self.use_bias else None,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=self.dtype_policy,
            name="attention_output",
        )
        if self.fused:
            self.query_key_value_dense.build(input_shape)
        else:
            self.query_dense.build(input_shape)
            key_value_shape = (*input_shape[:-1], self.key_value_dim)
            self.key_dense.build(key_value_shape)
            self.value_dense.build(key_value_shape)
        self.output_dense.build((None, None, self.num_heads, self.head_dim))
        if self.use_query_key_norm:
            self.query_norm.build((None, None, self.num_heads, self.head_dim))
            self.key_norm.build((None, None, self.num_key_value_heads, self.head_dim))
        self.built = True

    @property
    def fused(self):
        """Whether queries, keys and values are one product (`query_key_value`): keys from the layer's own input."""
        return self.key_value_dim is None

    def key_value(self, x):
        """Keys `(B, S, K, H)` (normed, no RoPE) and values for `x` `(B, S, D)`.

        The decoder appends these, computed from the encoder output, to its own
        keys and values; they depend only on the encoder output, so generation
        computes them once. Of the fused kernel only the key and value parts
        are multiplied.
        """
        if self.fused:
            key, value = ops.split(self.query_key_value_dense.call_parts(x, 1, 2), [self.num_key_value_heads], axis=2)
        else:
            key, value = self.key_dense(x), self.value_dense(x)
        if self.use_query_key_norm:
            key = self.key_norm(key)
        return key, value

    def _query_key_value(self, x):
        """Queries `(B, T, N, H)` (normed), keys (normed) and values `(B, T, K, H)` of `x`, in one product."""
        splits = [self.num_heads, self.num_heads + self.num_key_value_heads]
        query, key, value = ops.split(self.query_key_value_dense(x), splits, axis=2)
        if self.use_query_key_norm:
            query, key = self.query_norm(query), self.key_norm(key)
        return query, key, value

    def call(
        self,
        x,
        attention_mask=None,
        rope=None,
        cache=None,
        cache_update_index=None,
        cross_key_value=None,
        key_value=None,
        training=False,
    ):
        """Attends from `x` `(B, T, D)`.

        With a `masks.AttentionMask`, long inputs (`T * S` at least the
        `blockwise_settings` threshold) run `blockwise_attention`, whose memory
        grows linearly with the length; short ones build the dense mask.

        Args:
            attention_mask: `masks.AttentionMask`, or bool `(B, T, S_total)`,
                or None:
                over the self keys (the cache length when a cache is given),
                then the cross keys if any.
            rope: optional `(cos, sin)` for the positions of `x`.
            cache: optional `(key_cache, value_cache)`, each `(B, T_max, K, H)`;
                the new keys/values are written at `cache_update_index`.
            cross_key_value: optional `(key, value)` appended after the self
                keys (merged self+cross attention).
            key_value: optional `(key, value)`, `(B, S, K, H)` each, attended
                to in place of keys and values of `x` (a separate
                cross-attention block, no RoPE and no cache);
                `attention_mask` then covers these keys.

        Returns:
            `(B, T, D)`, and the updated cache when one was given.
        """
        if key_value is None:
            if not self.fused:
                raise ValueError("A cross-attention block (`key_value_dim`) attends to the `key_value` it is given.")
            query, key, value = self._query_key_value(x)
        else:
            if self.fused or rope is not None or cache is not None or cross_key_value is not None:
                raise ValueError(
                    "`key_value` goes to a cross-attention block (`key_value_dim`), with no `rope`, `cache` or "
                    "`cross_key_value`."
                )
            query = self.query_dense(x)
            if self.use_query_key_norm:
                query = self.query_norm(query)
            key, value = key_value
        if rope is not None:
            query = apply_rotary(query, *rope)
            key = apply_rotary(key, *rope)
        if cache is not None:
            key_cache, value_cache = cache
            start = [0, cache_update_index, 0, 0]
            key = ops.slice_update(key_cache, start, ops.cast(key, key_cache.dtype))
            value = ops.slice_update(value_cache, start, ops.cast(value, value_cache.dtype))
            cache = (key, value)
        mask = attention_mask
        if self._runs_blockwise(query, key, mask, cross_key_value, training):
            attended = blockwise_attention(
                query, key, value, mask, self.query_scale, self.soft_cap, cross_key_value, training
            )
        else:
            if isinstance(mask, AttentionMask):
                mask = mask.dense()
            if cross_key_value is not None:
                key = ops.concatenate([key, cross_key_value[0]], axis=1)
                value = ops.concatenate([value, cross_key_value[1]], axis=1)
            attended = grouped_attention(
                query,
                key,
                value,
                mask,
                scale=self.query_scale,
                soft_cap=self.soft_cap,
                dropout=self.dropout_layer,
                training=training,
            )
        output = self.output_dense(attended)
        return output if cache is None else (output, cache)

    def _runs_blockwise(self, query, key, mask, cross_key_value, training):
        if not isinstance(mask, AttentionMask):
            return False
        # Dropout on blocks would need a random stream per loop step; a
        # training step with attention dropout stays dense.
        if training and self.dropout_layer is not None:
            return False
        key_length = ops.shape(key)[1]
        if cross_key_value is not None:
            key_length = key_length + ops.shape(cross_key_value[0])[1]
        return use_blockwise(ops.shape(query)[1], key_length)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_scale": self.query_scale,
            "use_bias": self.use_bias,
            "use_query_key_norm": self.use_query_key_norm,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "soft_cap": self.soft_cap,
            "dropout": self.dropout,
            "key_value_dim": self.key_value_dim,
        }
