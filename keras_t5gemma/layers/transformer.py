"""Text transformer layers and the encoder/decoder stacks built from them.

One layer and one stack serve both generations; they differ by arguments:
- T5Gemma 2 (Gemma 3 layers): RMSNorm on queries and keys; the encoder's
  masks are bidirectional (its sliding window split around the query), and
  the decoder appends the encoder's keys/values to its own inside the same
  softmax ("merged attention").
- T5Gemma (Gemma 2 layers, `use_query_key_norm=False`, attention logits
  soft-capped): the decoder attends to the encoder in a block of its own
  (`cross_attention_dim`: its own softmax, projections and pre/post norms)
  between self-attention and the MLP, its keys/values projecting from the
  encoder's width, which may differ from the decoder's (9b-2b).
"""

import keras
from keras import ops

from keras_t5gemma.layers.attention import Attention
from keras_t5gemma.layers.feedforward import FeedForward
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.masks import AttentionMask
from keras_t5gemma.layers.masks import segment_positions
from keras_t5gemma.layers.normalization import RMSNormalization
from keras_t5gemma.layers.rotary import rotary_cos_sin


class TransformerLayer(keras.layers.Layer):
    """Pre- and post-normed attention and GeGLU blocks (a Gemma 2 or Gemma 3 layer).

    `x + post_norm(attention(pre_norm(x)))`, then the same around the
    cross-attention (with `cross_attention_dim`) and around the MLP.

    Args:
        intermediate_dim, num_heads, num_key_value_heads, head_dim: sizes.
        query_scale: float multiplied into the attention logits.
        layer_norm_epsilon: float.
        attention_soft_cap: optional float, in self- and cross-attention.
        use_query_key_norm: bool, RMSNorm on queries and keys (Gemma 3).
        cross_attention_dim: optional int, the encoder width: the layer gets
            a separate cross-attention block (T5Gemma decoder). Without it a
            decoder's encoder keys join the self-attention (merged).
        dropout: float, on the block outputs and MLP activations.
        attention_dropout: float, on the attention probabilities.
        remat: bool, recompute the layer in the backward pass instead of
            keeping its activations (`keras.remat`): a gradient then holds
            only each layer's input, for long-input training.
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
        use_query_key_norm=True,
        cross_attention_dim=None,
        dropout=0.0,
        attention_dropout=0.0,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.remat = remat
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_soft_cap = attention_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.cross_attention_dim = cross_attention_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout

        def norm(name):
            return RMSNormalization(layer_norm_epsilon, dtype=self.dtype_policy, name=name)

        def attention(name, key_value_dim=None):
            return Attention(
                num_heads,
                num_key_value_heads,
                head_dim,
                query_scale=query_scale,
                use_query_key_norm=use_query_key_norm,
                layer_norm_epsilon=layer_norm_epsilon,
                soft_cap=attention_soft_cap,
                dropout=attention_dropout,
                key_value_dim=key_value_dim,
                dtype=self.dtype_policy,
                name=name,
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.post_attention_norm = norm("post_attention_norm")
        self.attention = attention("attention")
        self.cross_attention = None
        if cross_attention_dim is not None:
            self.pre_cross_attention_norm = norm("pre_cross_attention_norm")
            self.post_cross_attention_norm = norm("post_cross_attention_norm")
            self.cross_attention = attention("cross_attention", key_value_dim=cross_attention_dim)
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

    def cross_key_value(self, encoder_output):
        """This layer's encoder `(key, value)`, `(B, S, K, H)` each, from `(B, S, D_encoder)`."""
        attention = self.attention if self.cross_attention is None else self.cross_attention
        return attention.key_value(encoder_output)

    def call(
        self,
        x,
        attention_mask,
        rope,
        cache=None,
        cache_update_index=None,
        cross_key_value=None,
        cross_attention_mask=None,
        training=False,
    ):
        """See `Attention.call` for `attention_mask`, `cache` and `cross_key_value`.

        With a cross-attention block, `cross_key_value` goes there, under
        `cross_attention_mask` (an `AttentionMask` over the encoder keys).
        """
        if self.remat and cache is None:
            # Tensors pass as arguments so the gradient reaches them; the
            # masks (positions, flags) are closed over.
            def layer(x, rope, cross_key_value):
                return self._forward(
                    x, attention_mask, rope, None, None, cross_key_value, cross_attention_mask, training
                )

            return keras.remat(layer)(x, rope, cross_key_value)
        return self._forward(
            x, attention_mask, rope, cache, cache_update_index, cross_key_value, cross_attention_mask, training
        )

    def _forward(
        self, x, attention_mask, rope, cache, cache_update_index, cross_key_value, cross_attention_mask, training
    ):
        separate = self.cross_attention is not None
        attended = self.attention(
            self.pre_attention_norm(x),
            attention_mask=attention_mask,
            rope=rope,
            cache=cache,
            cache_update_index=cache_update_index,
            cross_key_value=None if separate else cross_key_value,
            training=training,
        )
        if cache is not None:
            attended, cache = attended
        x = x + self.dropout_layer(self.post_attention_norm(attended), training=training)
        if separate:
            attended = self.cross_attention(
                self.pre_cross_attention_norm(x),
                attention_mask=cross_attention_mask,
                key_value=cross_key_value,
                training=training,
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
            "use_query_key_norm": self.use_query_key_norm,
            "cross_attention_dim": self.cross_attention_dim,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "remat": self.remat,
        }


class TransformerStack(keras.layers.Layer):
    """The encoder (`causal=False`) or decoder (`causal=True`) text stack.

    Runs input dropout, the layers, a final RMSNorm and output dropout. RoPE
    tables and `AttentionMask`s (positions, padding and segments, from which
    attention builds a dense mask or per-block masks) are made once per layer
    type and shared by the layers of that type.

    Packed rows (several examples in one row) pass `segment_ids`: each token
    attends only inside its segment (and a decoder token only to its own
    example's encoder tokens), and RoPE positions restart at each segment, so
    every example computes what it would alone.

    Args:
        layer_types: list of `"sliding_attention"` / `"full_attention"`.
        causal: bool, decoder (causal self-attention plus encoder keys) or
            encoder (bidirectional).
        sliding_window: int, the window of sliding layers in the convention
            of `masks.window_reach`.
        rope: dict layer type -> `(wavelength, scaling_factor)`.
        layer_kwargs: dict of `TransformerLayer` arguments; a decoder with
            `cross_attention_dim` attends to the encoder in separate blocks
            (T5Gemma), one without in its self-attention (T5Gemma 2).
        dropout: float.
        remat: bool, rematerialise each layer in the backward pass.
    """

    def __init__(self, layer_types, causal, sliding_window, rope, layer_kwargs, dropout=0.0, remat=False, **kwargs):
        super().__init__(**kwargs)
        if not causal and layer_kwargs.get("cross_attention_dim") is not None:
            raise ValueError("An encoder stack has no cross-attention; `cross_attention_dim` is for a decoder.")
        self.remat = remat
        self.layer_types = list(layer_types)
        self.causal = causal
        self.sliding_window = sliding_window
        self.rope = {key: tuple(value) for key, value in rope.items()}
        self.layer_kwargs = dict(layer_kwargs)
        self.dropout = dropout
        self.transformer_layers = [
            TransformerLayer(**layer_kwargs, dropout=dropout, remat=remat, dtype=self.dtype_policy, name=f"layer_{i}")
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

    def compute_output_shape(self, input_shape):
        # Given, so that building a backbone's functional graph does not trace
        # every layer's `call` (about 3 s of a 1b-1b load): `build` above has
        # made every variable, and the output has the input's shape.
        return tuple(input_shape)

    def cross_key_values(self, encoder_output):
        """Per-layer `(key, value)` of the encoder output, `(B, S, K, H)` each; computed once per generation."""
        return [layer.cross_key_value(encoder_output) for layer in self.transformer_layers]

    def _window(self, layer_type):
        return self.sliding_window if layer_type == SLIDING else None

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
        segment_ids=None,
        encoder_segment_ids=None,
    ):
        head_dim = self.layer_kwargs["head_dim"]
        # Masks measure windows on token indices; RoPE sees positions from
        # each segment's start.
        rope_positions = query_positions if segment_ids is None else segment_positions(segment_ids)
        separate = self.layer_kwargs.get("cross_attention_dim") is not None
        cross_attention_mask = None
        if cross_key_values is not None:
            cross_shape = ops.shape(cross_key_values[0][0])
            if encoder_padding_mask is None:
                encoder_padding_mask = ops.ones(cross_shape[:2], "bool")
            if separate:
                # Every decoder query sees every unpadded encoder key.
                cross_attention_mask = AttentionMask(
                    query_positions,
                    ops.arange(cross_shape[1], dtype="int32"),
                    causal=False,
                    key_padding_mask=encoder_padding_mask,
                    query_segment_ids=segment_ids,
                    key_segment_ids=encoder_segment_ids,
                )
        ropes, masks = {}, {}
        for layer_type in set(self.layer_types):
            wavelength, scaling = self.rope[layer_type]
            ropes[layer_type] = rotary_cos_sin(rope_positions, head_dim, wavelength, scaling, self.compute_dtype)
            masks[layer_type] = AttentionMask(
                query_positions,
                key_positions,
                causal=self.causal,
                sliding_window=self._window(layer_type),
                key_padding_mask=key_padding_mask,
                cross_padding_mask=None if cross_key_values is None or separate else encoder_padding_mask,
                aligned=caches is None,
                query_segment_ids=segment_ids,
                key_segment_ids=segment_ids,
                cross_segment_ids=encoder_segment_ids,
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
                cross_key_value=None if cross_key_values is None else cross_key_values[i],
                cross_attention_mask=cross_attention_mask,
                training=training,
            )
            if caches is not None:
                x, cache = x
                new_caches.append(cache)
        x = self.dropout_layer(self.final_norm(x), training=training)
        return x if caches is None else (x, new_caches)

    def call(
        self,
        x,
        padding_mask,
        encoder_output=None,
        encoder_padding_mask=None,
        training=False,
        segment_ids=None,
        encoder_segment_ids=None,
    ):
        """Full-sequence pass over `x` `(B, T, D)`; returns `(B, T, D)`.

        The decoder needs `encoder_output` `(B, S, D_encoder)` and its padding
        mask. Packed rows give `segment_ids` `(B, T)` (0 padding, 1..k the
        examples of a row) and, to a decoder, `encoder_segment_ids` `(B, S)`
        numbering the same examples.
        """
        if self.causal and encoder_output is None:
            raise ValueError("The decoder stack needs `encoder_output`.")
        if self.causal and (segment_ids is None) != (encoder_segment_ids is None):
            raise ValueError(
                "A packed decoder needs both `segment_ids` (its own) and `encoder_segment_ids`; got only one."
            )
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
            segment_ids=segment_ids,
            encoder_segment_ids=encoder_segment_ids,
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
            "remat": self.remat,
        }
