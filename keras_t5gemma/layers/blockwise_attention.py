"""Attention whose memory grows linearly with the sequence length.

Queries are cut into blocks of `blk` and every block keeps a running softmax
(row maximum, row sum, weighted sum of values) that is updated one chunk of
keys at a time, so no `T x S` logits or mask exist:

- sliding-window layers of a full-sequence pass see only the key blocks
  around their own (`before`/`after` reach from `masks.window_reach`): one
  chunk of `c * blk` keys per query block, time and memory `T * c * blk`;
- everything else (full-attention layers, a cached decoder step, the encoder
  keys of the decoder's merged attention) walks the keys in blocks with
  `ops.fori_loop`, each block seen by all query blocks at once.

Packed rows (segment ids on the `AttentionMask`) mask each chunk by segment
too. The result equals the dense softmax within float32 rounding. For training the
softmax takes two passes (row statistics, then the weighted values; see
`_BlockSoftmax`) and every loop step is rematerialised (`keras.remat`), so a
gradient keeps neither a block's probabilities nor a running sum per step.

Shape letters as in `attention.py`; `nq` query blocks of `blk` queries.
"""

import contextlib
import math

import keras
from keras import ops

from keras_t5gemma.layers.masks import MASKED_LOGIT
from keras_t5gemma.layers.masks import attention_mask
from keras_t5gemma.layers.masks import window_reach

_SETTINGS = {
    # Blockwise from this many logits per head (`T * S`) on; shorter inputs
    # keep the dense path (fused on JAX).
    "min_logits": 2048 * 2048,
    # Query block, and the key blocks of sliding layers.
    "block_size": 128,
    # Elements of one loop step's logits `(B, nq, K, G, blk, key_block)`; sets
    # the key block of full layers (at least `block_size`).
    "step_logits": 2**25,
    # Feed-forward inputs of more tokens (batch x length) run in chunks of
    # this many.
    "feedforward_tokens": 4096,
}


@contextlib.contextmanager
def blockwise_settings(min_logits=None, block_size=None, step_logits=None, feedforward_tokens=None):
    """Changes when and how the blockwise path runs, inside a `with` block.

    Settings are read when a model function is traced, so set them before the
    first call of a compiled function (`predict`, `generate`, `fit`).

    Args:
        min_logits: int, attention calls with at least this many logits per
            head (`T * S`) run blockwise; 0 makes every text attention
            blockwise. Default 2048 * 2048.
        block_size: int, query block (and sliding-layer key block). Default 128.
        step_logits: int, logits per loop step of full layers. Default 2**25.
        feedforward_tokens: int, feed-forward inputs of more tokens than this
            (batch x length) run in chunks of this many. Default 4096.

    Example:
    >>> with blockwise_settings(min_logits=0, block_size=4):
    ...     pass
    """
    new = {
        "min_logits": min_logits,
        "block_size": block_size,
        "step_logits": step_logits,
        "feedforward_tokens": feedforward_tokens,
    }
    for name, value in new.items():
        smallest = 0 if name == "min_logits" else 1
        if value is not None and (not isinstance(value, int) or value < smallest):
            raise ValueError(f"`{name}` must be an integer of at least {smallest}; got {value!r}.")
    previous = dict(_SETTINGS)
    _SETTINGS.update({k: v for k, v in new.items() if v is not None})
    try:
        yield
    finally:
        _SETTINGS.clear()
        _SETTINGS.update(previous)


def use_blockwise(query_length, key_length):
    """Whether `T` queries against `S` keys should run blockwise.

    Lengths unknown while tracing (`None` or tensors) keep the dense path.
    """
    if not isinstance(query_length, int) or not isinstance(key_length, int):
        return False
    return query_length * key_length >= _SETTINGS["min_logits"]


def feedforward_chunk(tokens):
    """Tokens per feed-forward chunk for an input of `tokens` (batch x length), or None for one piece."""
    chunk = _SETTINGS["feedforward_tokens"]
    return chunk if isinstance(tokens, int) and tokens > chunk else None


def _pad_axis(x, axis, before, after):
    if not before and not after:
        return x
    widths = [[0, 0]] * len(x.shape)
    widths[axis] = [before, after]
    return ops.pad(x, widths)


def _blocks(x, axis, block, before=0, after=0):
    """Pads axis `axis` (`before`/`after` blocks around) and splits it into `(n, block)`."""
    length = x.shape[axis]
    padded = math.ceil(length / block) * block
    x = _pad_axis(x, axis, before * block, padded - length + after * block)
    shape = list(ops.shape(x))
    shape[axis : axis + 1] = [shape[axis] // block, block]
    return ops.reshape(x, shape)


def _neighbours(blocks, axis, count, span):
    """`(.., nq + span - 1, blk, ..)` -> `(.., nq, span * blk, ..)`: each block with the next `span - 1`."""
    leading = (slice(None),) * axis
    return ops.concatenate([blocks[leading + (slice(o, o + count),)] for o in range(span)], axis=axis + 1)


class _Band:
    """Each query block's neighbouring key blocks, one chunk per query block.

    For a full-sequence pass (query `t` is key `t`) with a bounded reach:
    query block `q` sees key blocks `q - left .. q + right`.
    """

    per_block = True

    def __init__(self, key, value, key_valid, query_positions, causal, sliding_window, block, segments=None):
        count = ops.shape(query_positions)[0]
        before, after = window_reach(causal, sliding_window)
        left, right = math.ceil(before / block), math.ceil(after / block)
        span = left + 1 + right

        def neighbourhood(x, axis):
            return _neighbours(_blocks(x, axis, block, left, right), axis, count, span)

        self.key = neighbourhood(key, 1)  # (B, nq, span * blk, K, H)
        self.value = neighbourhood(value, 1)
        # Key slots past either end have padding zero, so their positions are
        # never seen.
        positions = neighbourhood(ops.arange(ops.shape(key)[1], dtype="int32"), 0)
        query_segments, key_segments = (None, None) if segments is None else segments
        self.mask = attention_mask(
            query_positions,
            positions,
            causal=causal,
            sliding_window=sliding_window,
            key_padding_mask=neighbourhood(key_valid, 1),
            query_segment_ids=query_segments,
            key_segment_ids=None if segments is None else neighbourhood(key_segments, 1),
        )  # (B, nq, blk, span * blk)


class _KeyBlocks:
    """Keys `(B, S, K, H)` in blocks of `block`, every block seen by all query blocks."""

    per_block = False

    def __init__(
        self, key, value, key_valid, key_positions, query_positions, causal, sliding_window, block, segments=None
    ):
        self.key = ops.moveaxis(_blocks(key, 1, block), 1, 0)  # (n, B, block, K, H)
        self.value = ops.moveaxis(_blocks(value, 1, block), 1, 0)
        self.valid = ops.moveaxis(_blocks(key_valid, 1, block), 1, 0)  # (n, B, block)
        self.positions = _blocks(key_positions, 0, block)  # (n, block)
        self.query_positions = query_positions
        self.causal = causal
        self.sliding_window = sliding_window
        self.count = ops.shape(self.key)[0]
        self.query_segments = self.key_segments = None
        if segments is not None:
            self.query_segments = segments[0]  # (B, nq, blk)
            self.key_segments = ops.moveaxis(_blocks(segments[1], 1, block), 1, 0)  # (n, B, block)

    def chunk(self, index):
        """Keys, values `(B, block, K, H)` and mask `(B, nq, blk, block)` of block `index`."""
        mask = attention_mask(
            self.query_positions,
            ops.take(self.positions, index, axis=0)[None],
            causal=self.causal,
            sliding_window=self.sliding_window,
            key_padding_mask=ops.take(self.valid, index, axis=0)[:, None],
            query_segment_ids=self.query_segments,
            key_segment_ids=None if self.key_segments is None else ops.take(self.key_segments, index, axis=0)[:, None],
        )
        return ops.take(self.key, index, axis=0), ops.take(self.value, index, axis=0), mask


def _rematerialised(function):
    # TensorFlow's `recompute_grad` does not nest in `tf.while_loop`; there
    # the loop keeps each step's activations for a gradient.
    if keras.config.backend() in ("jax", "torch"):
        return keras.remat(function)
    return function


def _fold(update, state, sources):
    """Runs `update(state, key, value, mask, per_block)` over every chunk of `sources`."""
    for source in sources:
        if source.per_block:
            state = update(state, source.key, source.value, source.mask, True)
            continue

        def step(index, state, source=source):
            return update(state, *source.chunk(index), False)

        # Recomputed in the backward pass: a gradient keeps only `state` and
        # the index per step, not the step's probabilities.
        state = ops.fori_loop(0, source.count, _rematerialised(step), state)
    return state


class _BlockSoftmax:
    """Softmax of the query blocks `(B, nq, blk, K, G, H)` over chunks of keys.

    Inference keeps a running softmax in one pass: row maximum and sum of
    exponentials `(B, nq, K, G, blk)` and the weighted sum of values
    `(B, nq, K, G, blk, H)`, rescaled when the maximum grows. For a gradient
    that running sum would be kept at every loop step, so training makes two
    passes: the row maximum and sum first, then a plain sum of
    `exp(logits - maximum) @ values`, which the backward pass does not keep
    per step. All statistics are float32.
    """

    def __init__(self, query, scale, soft_cap):
        self.query = query
        self.scale = scale
        self.soft_cap = soft_cap
        batch, count, block, kv_heads, groups, head_dim = ops.shape(query)
        self.rows = (batch, count, kv_heads, groups, block)
        self.head_dim = head_dim

    def logits(self, key, mask, per_block):
        """Masked float32 logits `(B, nq, K, G, blk, C)` for keys `(B, [nq,] C, K, H)`."""
        equation = "bqtkgh,bqskh->bqkgts" if per_block else "bqtkgh,bskh->bqkgts"
        logits = ops.cast(ops.einsum(equation, self.query, key), "float32") * self.scale
        if self.soft_cap is not None:
            logits = ops.tanh(logits / self.soft_cap) * self.soft_cap
        return ops.where(mask[:, :, None, None, :, :], logits, MASKED_LOGIT)

    @staticmethod
    def weigh(probabilities, value, per_block):
        equation = "bqkgts,bqskh->bqkgth" if per_block else "bqkgts,bskh->bqkgth"
        return ops.cast(ops.einsum(equation, ops.cast(probabilities, value.dtype), value), "float32")

    def running(self, sources):
        def update(state, key, value, mask, per_block):
            maximum, total, weighted = state
            logits = self.logits(key, mask, per_block)
            new_maximum = ops.maximum(maximum, ops.max(logits, axis=-1))
            correction = ops.exp(maximum - new_maximum)
            probabilities = ops.exp(logits - new_maximum[..., None])
            total = total * correction + ops.sum(probabilities, axis=-1)
            weighted = weighted * correction[..., None] + self.weigh(probabilities, value, per_block)
            return new_maximum, total, weighted

        state = (
            ops.full(self.rows, MASKED_LOGIT, "float32"),
            ops.zeros(self.rows, "float32"),
            ops.zeros((*self.rows, self.head_dim), "float32"),
        )
        _, total, weighted = _fold(update, state, sources)
        return weighted / total[..., None]

    def two_pass(self, sources):
        def statistics(state, key, value, mask, per_block):
            maximum, total = state
            logits = self.logits(key, mask, per_block)
            # The output does not depend on the shift, so its gradient is zero.
            new_maximum = ops.stop_gradient(ops.maximum(maximum, ops.max(logits, axis=-1)))
            correction = ops.exp(maximum - new_maximum)
            return new_maximum, total * correction + ops.sum(ops.exp(logits - new_maximum[..., None]), axis=-1)

        initial = (ops.full(self.rows, MASKED_LOGIT, "float32"), ops.zeros(self.rows, "float32"))
        maximum, total = _fold(statistics, initial, sources)

        def accumulate(weighted, key, value, mask, per_block):
            probabilities = ops.exp(self.logits(key, mask, per_block) - maximum[..., None])
            return weighted + self.weigh(probabilities, value, per_block)

        weighted = _fold(accumulate, ops.zeros((*self.rows, self.head_dim), "float32"), sources)
        return weighted / total[..., None]


def blockwise_attention(query, key, value, mask, scale, soft_cap=None, cross_key_value=None, training=False):
    """Grouped-query attention in blocks; the dense result without `T x S` tensors.

    Args:
        query: `(B, T, N, H)`.
        key, value: `(B, S, K, H)`, the self keys (a cache in a cached step).
        mask: `masks.AttentionMask` for these queries and keys.
        scale: float multiplied into the logits.
        soft_cap: optional float; logits become `cap * tanh(logits / cap)`.
        cross_key_value: optional `(key, value)`, `(B, S_cross, K, H)` each,
            in the same softmax after the self keys (merged attention).
        training: bool; the two-pass softmax, whose gradient keeps no per-step
            running sums.

    Returns:
        `(B, T, N, H)` in the query dtype.
    """
    batch, length, num_heads, head_dim = ops.shape(query)
    num_kv_heads = ops.shape(key)[2]
    block = _SETTINGS["block_size"]
    grouped = ops.reshape(query, (batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim))
    query_blocks = _blocks(grouped, 1, block)  # (B, nq, blk, K, G, H)
    count = ops.shape(query_blocks)[1]
    query_positions = _blocks(mask.query_positions, 0, block)  # (nq, blk)
    # Walked keys come in blocks sized so one loop step holds `step_logits`.
    known_batch = batch if isinstance(batch, int) else 1
    step_keys = _SETTINGS["step_logits"] // (known_batch * count * block * num_heads)
    key_block = max(block, 2 ** int(math.log2(max(step_keys, 1))))

    def valid(padding_mask, length):
        if padding_mask is None:
            return ops.ones((batch, length), "bool")
        return ops.broadcast_to(ops.cast(padding_mask, "bool"), (batch, length))

    key_length = ops.shape(key)[1]
    key_valid = valid(mask.key_padding_mask, key_length)
    # Packed rows: (query segments in blocks (B, nq, blk), key segments (B, S)).
    query_segments = None
    if mask.query_segment_ids is not None:
        query_segments = _blocks(ops.cast(mask.query_segment_ids, "int32"), 1, block)

    def segments(key_segment_ids):
        return None if query_segments is None else (query_segments, ops.cast(key_segment_ids, "int32"))

    before, after = window_reach(mask.causal, mask.sliding_window)
    if mask.aligned and before is not None and after is not None:
        sources = [
            _Band(
                key,
                value,
                key_valid,
                query_positions,
                mask.causal,
                mask.sliding_window,
                block,
                segments(mask.key_segment_ids),
            )
        ]
    else:
        sources = [
            _KeyBlocks(
                key,
                value,
                key_valid,
                mask.key_positions,
                query_positions,
                mask.causal,
                mask.sliding_window,
                min(key_block, _padded_length(key_length, block)),
                segments(mask.key_segment_ids),
            )
        ]
    if cross_key_value is not None:
        cross_key, cross_value = cross_key_value
        cross_length = ops.shape(cross_key)[1]
        sources.append(
            _KeyBlocks(
                cross_key,
                cross_value,
                valid(mask.cross_padding_mask, cross_length),
                ops.zeros((cross_length,), "int32"),
                query_positions,
                causal=False,
                sliding_window=None,
                block=min(key_block, _padded_length(cross_length, block)),
                segments=segments(mask.cross_segment_ids),
            )
        )
    softmax = _BlockSoftmax(query_blocks, scale, soft_cap)
    output = softmax.two_pass(sources) if training else softmax.running(sources)  # (B, nq, K, G, blk, H)
    output = ops.reshape(ops.moveaxis(output, 4, 2), (batch, count * block, num_heads, head_dim))
    return ops.cast(output[:, :length], query.dtype)


def _padded_length(length, block):
    return math.ceil(length / block) * block
