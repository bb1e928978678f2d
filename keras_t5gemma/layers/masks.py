"""The one place where attention masks are built.

Every mask is boolean, `True` where a query may attend to a key, with shape
`(B, T, S)` (or broadcastable to it): `T` queries, `S` keys.
"""

from keras import ops

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def attention_mask(
    query_positions,
    key_positions,
    *,
    causal,
    sliding_window=None,
    key_padding_mask=None,
):
    """Mask from positions, window and padding.

    Causal (decoder self-attention): query `i` sees key `j` when
    `0 <= i - j`, and with a window `w` also `i - j < w`.

    Bidirectional (encoder): all keys, or with a window `w`, keys with
    `0 <= i - j < (w + 1) // 2` or `0 < j - i < w // 2 + 1`, so the window is
    split around the query as the reference encoder splits it.

    Args:
        query_positions: int `(T,)`.
        key_positions: int `(S,)`.
        causal: bool.
        sliding_window: int or None.
        key_padding_mask: bool/int `(B, S)`; zero marks padding keys.

    Returns:
        bool `(B, T, S)`, or `(1, T, S)` without a padding mask.
    """
    distance = query_positions[:, None] - key_positions[None, :]
    if causal:
        allowed = distance >= 0
        if sliding_window is not None:
            allowed = ops.logical_and(allowed, distance < sliding_window)
    elif sliding_window is None:
        allowed = ops.ones_like(distance, dtype="bool")
    else:
        left = ops.logical_and(distance >= 0, distance < (sliding_window + 1) // 2)
        right = ops.logical_and(distance < 0, -distance < sliding_window // 2 + 1)
        allowed = ops.logical_or(left, right)
    allowed = allowed[None]
    if key_padding_mask is not None:
        allowed = ops.logical_and(allowed, padding_mask_for_keys(key_padding_mask))
    return allowed


def padding_mask_for_keys(padding_mask):
    """`(B, S)` padding mask as a `(B, 1, S)` boolean key mask."""
    return ops.cast(padding_mask, "bool")[:, None, :]
