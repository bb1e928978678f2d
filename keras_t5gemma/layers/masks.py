"""The one place where attention masks are built.

A mask is boolean, `True` where a query may attend to a key. It is always
derived from positions and padding: `attention_mask` broadcasts over any
leading axes, so the same function gives the dense `(B, T, S)` mask of a short
input and the per-block masks of the blockwise path (`(B, nq, blk, c*blk)`),
which never materialises `T x S`. `AttentionMask` carries the positions and
padding of one attention call, so the attention layer can pick either path.
"""

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
):
    """Mask from positions, window and padding.

    Shapes broadcast over leading axes `...` (none for a dense mask, the
    query-block axis for the blockwise path).

    Args:
        query_positions: int `(..., T)`.
        key_positions: int `(..., S)`.
        causal: bool; see `window_reach`.
        sliding_window: int or None.
        key_padding_mask: bool/int `(B, ..., S)`; zero marks keys that may not
            be seen (padding).

    Returns:
        bool `(B, ..., T, S)`, or `(1, ..., T, S)` without a padding mask.
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
    return allowed


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
    ):
        self.query_positions = query_positions
        self.key_positions = key_positions
        self.causal = causal
        self.sliding_window = sliding_window
        self.key_padding_mask = key_padding_mask
        self.cross_padding_mask = cross_padding_mask
        self.aligned = aligned

    def dense(self):
        """bool `(B, T, S [+ S_cross])` (batch 1 when nothing is padded)."""
        mask = attention_mask(
            self.query_positions,
            self.key_positions,
            causal=self.causal,
            sliding_window=self.sliding_window,
            key_padding_mask=self.key_padding_mask,
        )
        if self.cross_padding_mask is None:
            return mask
        cross = ops.cast(self.cross_padding_mask, "bool")[:, None, :]
        batch = ops.shape(cross)[0]
        length = ops.shape(mask)[1]
        mask = ops.broadcast_to(mask, (batch, length, ops.shape(mask)[2]))
        cross = ops.broadcast_to(cross, (batch, length, ops.shape(cross)[2]))
        return ops.concatenate([mask, cross], axis=-1)
