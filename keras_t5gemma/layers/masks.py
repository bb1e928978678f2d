"""The one place where attention masks are built.

A mask is boolean, `True` where a query may attend to a key. It is always
derived from positions, padding and segments (packed rows: several examples
share a row, each token marked with its example's segment id, 0 for padding,
and attends only inside its segment): `attention_mask` broadcasts over any
leading axes, so the same function gives the dense `(B, T, S)` mask of a short
input and the per-block masks of the blockwise path (`(B, nq, blk, c*blk)`),
which never materialises `T x S`. `AttentionMask` carries the positions,
padding and segments of one attention call, so the attention layer can pick
either path.

Mask positions are token indices; windows and causality measured on them
equal those measured inside a segment, since each segment is contiguous.
RoPE positions restart at each segment instead (`segment_positions`).
"""

import keras
from keras import ops

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# The logit of a key a query may not see. Large but finite, so a row whose keys
# are all masked (a padding query) gives a uniform softmax instead of NaN (NaN
# would leak through `0 * NaN` into the values).
MASKED_LOGIT = -1e30


def window_reach(causal, sliding_window):
    """How far a query sees: `(before, after)` in positions, `None` unbounded.

    Query `i` sees key `j` when `-after <= i - j <= before`.

    Causal (decoder self-attention): `0 <= i - j`, and with a window `w` also
    `i - j < w`, so `(w - 1, 0)`.

    Bidirectional (encoder) with a window `w`: `0 <= i - j < (w + 1) // 2` or
    `0 < j - i < w // 2 + 1`, the split the reference encoder makes, so
    `((w + 1) // 2 - 1, w // 2)`. Without a window: everything.
    """
    if sliding_window is None:
        return (None, 0) if causal else (None, None)
    if causal:
        return sliding_window - 1, 0
    return (sliding_window + 1) // 2 - 1, sliding_window // 2


def attention_mask(
    query_positions,
    key_positions,
    *,
    causal,
    sliding_window=None,
    key_padding_mask=None,
    query_segment_ids=None,
    key_segment_ids=None,
):
    """Mask from positions, window, padding and segments.

    Shapes broadcast over leading axes `...` (none for a dense mask, the
    query-block axis for the blockwise path).

    Args:
        query_positions: int `(..., T)`.
        key_positions: int `(..., S)`.
        causal: bool; see `window_reach`.
        sliding_window: int or None.
        key_padding_mask: bool/int `(B, ..., S)`; zero marks keys that may not
            be seen (padding).
        query_segment_ids: int `(B, ..., T)` or None; with
            `key_segment_ids` `(B, ..., S)`, a query sees only keys of its
            own segment.

    Returns:
        bool `(B, ..., T, S)`, or `(1, ..., T, S)` without a padding mask
        or segments.
    """
    before, after = window_reach(causal, sliding_window)
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    allowed = ops.ones_like(distance, dtype="bool")
    if before is not None:
        allowed = ops.logical_and(allowed, distance <= before)
    if after is not None:
        allowed = ops.logical_and(allowed, -distance <= after)
    allowed = allowed[None]
    if key_padding_mask is not None:
        allowed = ops.logical_and(allowed, ops.cast(key_padding_mask, "bool")[..., None, :])
    if query_segment_ids is not None:
        allowed = ops.logical_and(allowed, same_segment(query_segment_ids, key_segment_ids))
    return allowed


def same_segment(query_segment_ids, key_segment_ids):
    """bool `(B, ..., T, S)`: query and key belong to the same segment."""
    return ops.equal(
        ops.cast(query_segment_ids, "int32")[..., :, None], ops.cast(key_segment_ids, "int32")[..., None, :]
    )


def segment_positions(segment_ids):
    """Positions restarting at 0 where each segment starts: int `(B, T)` for segment ids `(B, T)`.

    A segment is a run of equal ids, so `[[1, 1, 1, 2, 2, 0, 0]]` gives
    `[[0, 1, 2, 0, 1, 0, 1]]` (padding counts as a run of its own and is
    never seen).

    Example:
    >>> ops.convert_to_numpy(segment_positions(ops.convert_to_tensor([[1, 1, 2, 0]]))).tolist()
    [[0, 1, 0, 0]]
    """
    segment_ids = ops.cast(segment_ids, "int32")
    index = ops.broadcast_to(ops.arange(ops.shape(segment_ids)[1], dtype="int32")[None], ops.shape(segment_ids))
    first = ops.ones_like(segment_ids[:, :1], dtype="bool")
    starts = ops.concatenate([first, ops.not_equal(segment_ids[:, 1:], segment_ids[:, :-1])], axis=1)
    # The latest segment start at or before each token.
    start_indices = ops.where(starts, index, 0)
    if keras.config.backend() == "jax":
        # A primitive, so Keras' shape-only trace (symbolic lengths) passes too.
        import jax

        start = jax.lax.cummax(start_indices, axis=1)
    else:
        # Each segment's start index, summed over its tokens (only its first is not 0) and read back per
        # token: linear in the length. (Keras' `associative_scan` nests one TensorFlow `cond` per level and
        # step; a backbone took minutes to build on TensorFlow.) Every row starts a segment, so the
        # running count of starts over the flattened rows numbers the segments in order.
        segment = ops.cumsum(ops.reshape(ops.cast(starts, "int32"), (-1,))) - 1
        # At most one segment per token; a count known when tracing, as XLA needs.
        count = ops.shape(segment)[0]
        segment_start = ops.segment_sum(ops.reshape(start_indices, (-1,)), segment, num_segments=count)
        start = ops.reshape(ops.take(segment_start, segment), ops.shape(segment_ids))
    return ops.cast(index - start, "int32")


class AttentionMask:
    """What the queries of one attention call may see, as positions and padding.

    Holds no `T x S` tensor: `dense()` builds the full mask for short inputs,
    and the blockwise path builds one block at a time with `attention_mask`.

    Args:
        query_positions: int `(T,)`.
        key_positions: int `(S,)`, the self keys (the cache length in a cached
            decoder step).
        causal: bool.
        sliding_window: int or None.
        key_padding_mask: `(B, S)` or None.
        cross_padding_mask: `(B, S_cross)` or None; the decoder's encoder keys,
            appended after the self keys (merged attention), seen by every
            query except where this is zero.
        aligned: bool, query `t` and key `t` are the same token (a full
            sequence pass, not a cached step), so sliding layers can attend
            to neighbouring key blocks only.
        query_segment_ids: int `(B, T)` or None (no packing).
        key_segment_ids: int `(B, S)`, with `query_segment_ids`.
        cross_segment_ids: int `(B, S_cross)`, the encoder keys' segments,
            with `query_segment_ids`: a decoder token sees the encoder tokens
            of its own example only.
    """

    def __init__(
        self,
        query_positions,
        key_positions,
        *,
        causal,
        sliding_window=None,
        key_padding_mask=None,
        cross_padding_mask=None,
        aligned=False,
        query_segment_ids=None,
        key_segment_ids=None,
        cross_segment_ids=None,
    ):
        self.query_positions = query_positions
        self.key_positions = key_positions
        self.causal = causal
        self.sliding_window = sliding_window
        self.key_padding_mask = key_padding_mask
        self.cross_padding_mask = cross_padding_mask
        self.aligned = aligned
        self.query_segment_ids = query_segment_ids
        self.key_segment_ids = key_segment_ids
        self.cross_segment_ids = cross_segment_ids

    def dense(self):
        """bool `(B, T, S [+ S_cross])` (batch 1 when nothing is padded or packed)."""
        mask = attention_mask(
            self.query_positions,
            self.key_positions,
            causal=self.causal,
            sliding_window=self.sliding_window,
            key_padding_mask=self.key_padding_mask,
            query_segment_ids=self.query_segment_ids,
            key_segment_ids=self.key_segment_ids,
        )
        if self.cross_padding_mask is None:
            return mask
        cross = ops.cast(self.cross_padding_mask, "bool")[:, None, :]
        if self.query_segment_ids is not None:
            cross = ops.logical_and(cross, same_segment(self.query_segment_ids, self.cross_segment_ids))
        batch = ops.shape(cross)[0]
        length = ops.shape(mask)[1]
        mask = ops.broadcast_to(mask, (batch, length, ops.shape(mask)[2]))
        cross = ops.broadcast_to(cross, (batch, length, ops.shape(cross)[2]))
        return ops.concatenate([mask, cross], axis=-1)
