"""T5Gemma (first generation) stacks: Gemma 2 layers, and a separate cross-attention block in the decoder.

What differs from the T5Gemma 2 stacks in `transformer.py`, all by
configuration of the shared `Attention`, masks, RoPE, RMSNorm and MLP:
- no RMSNorm on queries and keys; attention logits soft-capped;
- the decoder attends to the encoder in its own block (its own softmax,
  projections and pre/post norms) between self-attention and the MLP, and
  its keys/values project from the encoder's width, which may differ from
  the decoder's (unbalanced models such as 9b-2b);
- one RoPE base for every layer.
"""

import keras
from keras import ops

from keras_t5gemma.layers.attention import Attention
from keras_t5gemma.layers.attention import grouped_attention
from keras_t5gemma.layers.feedforward import FeedForward
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.masks import attention_mask
from keras_t5gemma.layers.normalization import RMSNormalization
from keras_t5gemma.layers.rotary import rotary_cos_sin


class CrossAttention(Attention):
    """Decoder queries attending to encoder keys/values only.

    The projections, scale, soft cap and dropout are `Attention`'s; the keys
    and values project the encoder output, of width `key_value_dim`.

    Args:
        key_value_dim: int, the encoder width the keys and values read.
        Others as `Attention` (`use_query_key_norm` defaults to False).

    Example:
    >>> attention = CrossAttention(8, num_heads=4, num_key_value_heads=2, head_dim=8, query_scale=0.35)
    >>> attention.build((None, None, 16))
    >>> encoder_key_value = attention.key_value(keras.ops.ones((2, 7, 8)))
    >>> attention(keras.ops.ones((2, 5, 16)), encoder_key_value, keras.ops.ones((2, 7))).shape
    (2, 5, 16)
    """

    def __init__(self, key_value_dim, *args, use_query_key_norm=False, **kwargs):
        super().__init__(*args, use_query_key_norm=use_query_key_norm, **kwargs)
        self.key_value_dim = key_value_dim

    def build(self, input_shape):
        # `Attention.build` reads every projection's input width from
        # `input_shape`; here only the queries and the output are the
        # decoder's, keys and values read the encoder output.
        key_value_shape = (*input_shape[:-1], self.key_value_dim)
        self.query_dense.build(input_shape)
        self.key_dense.build(key_value_shape)
        self.value_dense.build(key_value_shape)
        self.output_dense = keras.layers.EinsumDense(
            "btnv,nvd->btd",
            output_shape=(None, input_shape[-1]),
            bias_axes="d" if self.use_bias else None,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=self.dtype_policy,
            name="attention_output",
        )
        self.output_dense.build((None, None, self.num_heads, self.head_dim))
        if self.use_query_key_norm:
            self.query_norm.build((None, None, self.num_heads, self.head_dim))
            self.key_norm.build((None, None, self.num_key_value_heads, self.head_dim))
        self.built = True

    def call(self, x, encoder_key_value, encoder_padding_mask=None, training=False):
        """Attends from `x` `(B, T, D)` to `encoder_key_value`, each `(B, S, K, H)`.

        `encoder_padding_mask` `(B, S)`: zero marks encoder padding. No RoPE:
        positions do not relate decoder and encoder tokens.
        """
        query = self.query_dense(x)
        if self.use_query_key_norm:
            query = self.query_norm(query)
        mask = None
        if encoder_padding_mask is not None:
            mask = ops.cast(encoder_padding_mask, "bool")[:, None, :]
        key, value = encoder_key_value
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
        return self.output_dense(attended)

    def get_config(self):
        return {**super().get_config(), "key_value_dim": self.key_value_dim}


class CrossAttentionTransformerLayer(keras.layers.Layer):
    """A Gemma 2 layer, with a cross-attention block when `cross_attention_dim` is set.

    `x + post_norm(self_attention(pre_norm(x)))`, then the same around the
    cross-attention (decoder only) and around the MLP; every block has its
    own pre- and post-norm.

    Args:
        intermediate_dim, num_heads, num_key_value_heads, head_dim: sizes.
        query_scale: float multiplied into the attention logits.
        layer_norm_epsilon: float.
        attention_soft_cap: optional float, in self- and cross-attention.
        cross_attention_dim: int, the encoder width (decoder layers), or
            `None` (encoder layers).
        dropout: float, on the block outputs and MLP activations.
        attention_dropout: float, on the attention probabilities.
    """

    def __init__(
        self,
        intermediate_dim,
        num_heads,
        num_key_value_heads,
        head_dim,
        query_scale,
        layer_norm_epsilon=1e-6,
        attention_soft_cap=None,
        cross_attention_dim=None,
        dropout=0.0,
        attention_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_soft_cap = attention_soft_cap
        self.cross_attention_dim = cross_attention_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout

        def norm(name):
            return RMSNormalization(layer_norm_epsilon, dtype=self.dtype_policy, name=name)

        attention_kwargs = {
            "num_heads": num_heads,
            "num_key_value_heads": num_key_value_heads,
            "head_dim": head_dim,
            "query_scale": query_scale,
            "use_query_key_norm": False,
            "soft_cap": attention_soft_cap,
            "dropout": attention_dropout,
            "dtype": self.dtype_policy,
        }
        self.pre_attention_norm = norm("pre_attention_norm")
        self.post_attention_norm = norm("post_attention_norm")
        self.attention = Attention(**attention_kwargs, name="attention")
        self.cross_attention = None
        if cross_attention_dim is not None:
            self.pre_cross_attention_norm = norm("pre_cross_attention_norm")
            self.post_cross_attention_norm = norm("post_cross_attention_norm")
            self.cross_attention = CrossAttention(cross_attention_dim, **attention_kwargs, name="cross_attention")
        self.pre_feedforward_norm = norm("pre_feedforward_norm")
        self.post_feedforward_norm = norm("post_feedforward_norm")
        self.feedforward = FeedForward(intermediate_dim, dropout=dropout, dtype=self.dtype_policy, name="feedforward")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        norms = [self.pre_attention_norm, self.post_attention_norm, self.pre_feedforward_norm]
        norms.append(self.post_feedforward_norm)
        if self.cross_attention is not None:
            norms += [self.pre_cross_attention_norm, self.post_cross_attention_norm]
            self.cross_attention.build(input_shape)
        for norm in norms:
            norm.build(input_shape)
        self.attention.build(input_shape)
        self.feedforward.build(input_shape)
        self.built = True

    def call(
        self,
        x,
        attention_mask,
        rope,
        cache=None,
        cache_update_index=None,
        encoder_key_value=None,
        encoder_padding_mask=None,
        training=False,
    ):
        """`x` `(B, T, D)`; `attention_mask` bool `(B, T, S)`; see `Attention.call` for `cache`.

        Decoder layers need `encoder_key_value` (this layer's
        `cross_attention.key_value` of the encoder output) and the encoder's
        padding mask.
        """
        attended = self.attention(
            self.pre_attention_norm(x),
            attention_mask,
            rope=rope,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
        )
        if cache is not None:
            attended, cache = attended
        x = x + self.dropout_layer(self.post_attention_norm(attended), training=training)
        if self.cross_attention is not None:
            attended = self.cross_attention(
                self.pre_cross_attention_norm(x), encoder_key_value, encoder_padding_mask, training=training
            )
            x = x + self.dropout_layer(self.post_cross_attention_norm(attended), training=training)
        fed = self.feedforward(self.pre_feedforward_norm(x), training=training)
        x = x + self.dropout_layer(self.post_feedforward_norm(fed), training=training)
        return x if cache is None else (x, cache)

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_scale": self.query_scale,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention_soft_cap": self.attention_soft_cap,
            "cross_attention_dim": self.cross_attention_dim,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
        }


class CrossAttentionTransformerStack(keras.layers.Layer):
    """The T5Gemma encoder (`causal=False`) or decoder (`causal=True`) stack.

    The same interface as `transformer.TransformerStack` (`call`,
    `call_with_cache`, `cross_key_values`, `transformer_layers`,
    `final_norm`, `layer_kwargs`), so that generation code serves both
    generations.

    Args:
        layer_types: list of `"sliding_attention"` / `"full_attention"`.
        causal: bool, decoder or encoder.
        sliding_window: int, the window of sliding layers in the convention
            of `masks.window_reach`.
        rope: dict layer type -> `(wavelength, scaling_factor)`.
        layer_kwargs: dict of `CrossAttentionTransformerLayer` arguments
            (`cross_attention_dim` for a decoder).
        dropout: float.
    """

    def __init__(self, layer_types, causal, sliding_window, rope, layer_kwargs, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if causal != (layer_kwargs.get("cross_attention_dim") is not None):
            raise ValueError("A decoder stack needs `cross_attention_dim` in `layer_kwargs`; an encoder none.")
        self.layer_types = list(layer_types)
        self.causal = causal
        self.sliding_window = sliding_window
        self.rope = {key: tuple(value) for key, value in rope.items()}
        self.layer_kwargs = dict(layer_kwargs)
        self.dropout = dropout
        self.transformer_layers = [
            CrossAttentionTransformerLayer(**layer_kwargs, dropout=dropout, dtype=self.dtype_policy, name=f"layer_{i}")
            for i in range(len(self.layer_types))
        ]
        self.final_norm = RMSNormalization(
            layer_kwargs.get("layer_norm_epsilon", 1e-6), dtype=self.dtype_policy, name="final_norm"
        )
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        for layer in self.transformer_layers:
            layer.build(input_shape)
        self.final_norm.build(input_shape)
        self.built = True

    def cross_key_values(self, encoder_output):
        """Per-layer encoder `(key, value)`, `(B, S, K, H)` each; computed once per generation."""
        return [layer.cross_attention.key_value(encoder_output) for layer in self.transformer_layers]

    def _run(
        self,
        x,
        query_positions,
        key_positions,
        key_padding_mask,
        caches=None,
        cache_update_index=None,
        cross_key_values=None,
        encoder_padding_mask=None,
        training=False,
    ):
        head_dim = self.layer_kwargs["head_dim"]
        ropes, masks = {}, {}
        for layer_type in set(self.layer_types):
            wavelength, scaling = self.rope[layer_type]
            ropes[layer_type] = rotary_cos_sin(query_positions, head_dim, wavelength, scaling, self.compute_dtype)
            masks[layer_type] = attention_mask(
                query_positions,
                key_positions,
                causal=self.causal,
                sliding_window=self.sliding_window if layer_type == SLIDING else None,
                key_padding_mask=key_padding_mask,
            )
        x = self.dropout_layer(x, training=training)
        new_caches = []
        for i, (layer, layer_type) in enumerate(zip(self.transformer_layers, self.layer_types)):
            x = layer(
                x,
                attention_mask=masks[layer_type],
                rope=ropes[layer_type],
                cache=None if caches is None else caches[i],
                cache_update_index=cache_update_index,
                encoder_key_value=None if cross_key_values is None else cross_key_values[i],
                encoder_padding_mask=encoder_padding_mask,
                training=training,
            )
            if caches is not None:
                x, cache = x
                new_caches.append(cache)
        x = self.dropout_layer(self.final_norm(x), training=training)
        return x if caches is None else (x, new_caches)

    def call(self, x, padding_mask, encoder_output=None, encoder_padding_mask=None, training=False):
        """Full-sequence pass over `x` `(B, T, D)`; returns `(B, T, D)`.

        The decoder needs `encoder_output` `(B, S, D_encoder)` and its padding mask.
        """
        if self.causal and encoder_output is None:
            raise ValueError("The decoder stack needs `encoder_output`.")
        positions = ops.arange(ops.shape(x)[1], dtype="int32")
        cross = None if encoder_output is None else self.cross_key_values(encoder_output)
        return self._run(
            x,
            positions,
            positions,
            padding_mask,
            cross_key_values=cross,
            encoder_padding_mask=encoder_padding_mask,
            training=training,
        )

    def call_with_cache(self, x, cache_update_index, caches, cross_key_values, encoder_padding_mask):
        """Decoder pass over `x` `(B, T, D)` at positions `cache_update_index + t`.

        Args:
            caches: per-layer `(key_cache, value_cache)`, `(B, T_max, K, H)`.
            cross_key_values: per-layer encoder `(key, value)`.
            encoder_padding_mask: `(B, S)`.

        Returns:
            `(hidden (B, T, D), updated caches)`.
        """
        length = ops.shape(x)[1]
        query_positions = cache_update_index + ops.arange(length, dtype="int32")
        key_positions = ops.arange(ops.shape(caches[0][0])[1], dtype="int32")
        return self._run(
            x,
            query_positions,
            key_positions,
            None,
            caches=caches,
            cache_update_index=cache_update_index,
            cross_key_values=cross_key_values,
            encoder_padding_mask=encoder_padding_mask,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "layer_types": self.layer_types,
            "causal": self.causal,
            "sliding_window": self.sliding_window,
            "rope": {key: list(value) for key, value in self.rope.items()},
            "layer_kwargs": self.layer_kwargs,
            "dropout": self.dropout,
        }
