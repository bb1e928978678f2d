"""Sequence packing: several preprocessed examples share one encoder row and one decoder row.

On long-tailed data (most examples short, a few long) padding every example
to the longest one spends most of a step on padding. Packing places examples
one after another in rows of `encoder_length` / `decoder_length` tokens,
greedy first fit in the order given (each example goes to the first row with
room for both its encoder and its decoder tokens), and numbers them within a
row with segment ids (1, 2, ...; 0 is padding) that the T5Gemma 2 backbone
takes as `encoder_segment_ids` / `decoder_segment_ids`. The model then keeps
attention inside each example and restarts positions at each example's first
token, so every example computes exactly what it computes alone.

The loss should count target tokens, not rows: compile with `token_mean_loss()`
(Keras' `"mean_with_sample_weight"` reduction), and a packed batch's loss and
gradients equal those of the same examples padded one per row.

Example:
```python
seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
x, y, sample_weight = seq_2_seq_lm.preprocessor(
    {"encoder_text": ["reverse: 1 2", "reverse: 3 4 5"], "decoder_text": ["2 1", "5 4 3"]}
)
x, y, sample_weight = pack_examples(x, y, sample_weight)
seq_2_seq_lm.compile(loss=token_mean_loss(), optimizer="adam")
seq_2_seq_lm.fit(x, y, sample_weight=sample_weight, batch_size=2)
```
"""

import keras
import numpy as np

ENCODER_KEYS = ("encoder_token_ids", "encoder_padding_mask")
DECODER_KEYS = ("decoder_token_ids", "decoder_padding_mask")


def token_mean_loss():
    """The LM loss averaged over target tokens (`sample_weight`), the same for packed and padded batches."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")


def _lengths(padding_mask, name):
    """Tokens per row of a right-padded `(N, L)` mask; refuses a mask with holes or left padding."""
    mask = np.asarray(padding_mask).astype(bool)
    lengths = mask.sum(axis=1)
    contiguous = mask == (np.arange(mask.shape[1])[None] < lengths[:, None])
    bad = np.flatnonzero(~contiguous.all(axis=1))
    if bad.size:
        raise ValueError(
            f"`{name}` of example {bad[0]} is not right-padded (its tokens must come first, then padding); "
            "pack the preprocessor's output."
        )
    return lengths


def first_fit(encoder_lengths, decoder_lengths, encoder_length, decoder_length, max_segments=None):
    """Rows for examples of the given lengths, greedy first fit in order.

    Args:
        encoder_lengths, decoder_lengths: int `(N,)`, each example's tokens.
        encoder_length, decoder_length: int, a row's room.
        max_segments: optional int, at most this many examples per row.

    Returns:
        `(row, start_encoder, start_decoder)`, int `(N,)` each: the row each
        example goes to and where its tokens start there.

    Raises:
        ValueError: an example longer than a row.

    Example:
    >>> first_fit([3, 2, 2], [1, 1, 1], encoder_length=4, decoder_length=4)[0].tolist()
    [0, 1, 1]
    """
    encoder_lengths = np.asarray(encoder_lengths, dtype=np.int64)
    decoder_lengths = np.asarray(decoder_lengths, dtype=np.int64)
    count = len(encoder_lengths)
    for name, lengths, room in (
        ("encoder", encoder_lengths, encoder_length),
        ("decoder", decoder_lengths, decoder_length),
    ):
        too_long = np.flatnonzero(lengths > room)
        if too_long.size:
            raise ValueError(
                f"Example {too_long[0]} has {lengths[too_long[0]]} {name} tokens, more than a row's {room}."
            )
    # Room left in each row opened so far (at most one row per example).
    encoder_room = np.zeros(count, np.int64)
    decoder_room = np.zeros(count, np.int64)
    segments = np.zeros(count, np.int64)
    opened = 0
    row = np.zeros(count, np.int64)
    start_encoder = np.zeros(count, np.int64)
    start_decoder = np.zeros(count, np.int64)
    limit = max_segments or np.iinfo(np.int64).max
    for i in range(count):
        fits = (encoder_room[:opened] >= encoder_lengths[i]) & (decoder_room[:opened] >= decoder_lengths[i])
        fits &= segments[:opened] < limit
        found = np.flatnonzero(fits)
        if found.size:
            r = found[0]
        else:
            r = opened
            opened += 1
            encoder_room[r], decoder_room[r] = encoder_length, decoder_length
        row[i] = r
        start_encoder[i] = encoder_length - encoder_room[r]
        start_decoder[i] = decoder_length - decoder_room[r]
        encoder_room[r] -= encoder_lengths[i]
        decoder_room[r] -= decoder_lengths[i]
        segments[r] += 1
    return row, start_encoder, start_decoder


def pack_examples(x, y=None, sample_weight=None, encoder_length=None, decoder_length=None, max_segments=None):
    """Packs preprocessed examples (one per row, right-padded) into shared rows.

    Each example keeps its tokens, labels and weights; only where they sit
    changes. Rows come in the order they were opened.

    Args:
        x: dict of `(N, S)` `encoder_token_ids`, `encoder_padding_mask` and
            `(N, T)` `decoder_token_ids`, `decoder_padding_mask`, as
            `T5Gemma2Seq2SeqLMPreprocessor` gives them (NumPy or tensors).
        y: optional int `(N, T)`, the labels (next decoder tokens).
        sample_weight: optional `(N, T)`, the labels' weights.
        encoder_length, decoder_length: int, the packed rows' lengths;
            default the inputs' widths.
        max_segments: optional int, at most this many examples per row.

    Returns:
        `(x, y, sample_weight)` as NumPy arrays of `M <= N` rows; `x` adds
        `encoder_segment_ids` `(M, encoder_length)` and `decoder_segment_ids`
        `(M, decoder_length)` (k for the k-th example of a row, 0 padding).
        `y` and `sample_weight` are None where not given. Positions are not
        stored: the model restarts them at each segment.

    Raises:
        ValueError: a missing input, padding that is not on the right, or an
            example longer than a row.

    Example:
    >>> x = {
    ...     "encoder_token_ids": np.array([[5, 6, 0], [7, 0, 0]]),
    ...     "encoder_padding_mask": np.array([[1, 1, 0], [1, 0, 0]]),
    ...     "decoder_token_ids": np.array([[2, 8], [2, 0]]),
    ...     "decoder_padding_mask": np.array([[1, 1], [1, 0]]),
    ... }
    >>> packed, _, _ = pack_examples(x, decoder_length=3)
    >>> packed["encoder_token_ids"].tolist(), packed["decoder_segment_ids"].tolist()
    ([[5, 6, 7]], [[1, 1, 2]])
    """
    missing = [key for key in ENCODER_KEYS + DECODER_KEYS if key not in x]
    if missing:
        raise ValueError(f"`x` lacks {missing}; pack the output of the Seq2SeqLM preprocessor.")
    arrays = {key: np.asarray(keras.ops.convert_to_numpy(x[key])) for key in ENCODER_KEYS + DECODER_KEYS}
    targets = {}
    for name, value in (("y", y), ("sample_weight", sample_weight)):
        if value is not None:
            targets[name] = np.asarray(keras.ops.convert_to_numpy(value))
            if targets[name].shape != arrays["decoder_token_ids"].shape:
                raise ValueError(
                    f"`{name}` has shape {targets[name].shape}, not that of `decoder_token_ids` "
                    f"{arrays['decoder_token_ids'].shape}."
                )
    encoder_lengths = _lengths(arrays["encoder_padding_mask"], "encoder_padding_mask")
    decoder_lengths = _lengths(arrays["decoder_padding_mask"], "decoder_padding_mask")
    if "sample_weight" in targets:
        # Weights past an example's decoder tokens would be lost in packing.
        beyond = np.arange(targets["sample_weight"].shape[1])[None] >= decoder_lengths[:, None]
        bad = np.flatnonzero((targets["sample_weight"] * beyond).any(axis=1))
        if bad.size:
            raise ValueError(
                f"Example {bad[0]} has label weights past its {decoder_lengths[bad[0]]} decoder tokens; "
                "the weights must follow `decoder_padding_mask`."
            )
    encoder_length = encoder_length or arrays["encoder_token_ids"].shape[1]
    decoder_length = decoder_length or arrays["decoder_token_ids"].shape[1]
    row, start_encoder, start_decoder = first_fit(
        encoder_lengths, decoder_lengths, encoder_length, decoder_length, max_segments
    )
    rows = int(row.max()) + 1 if len(row) else 0
    segment = np.zeros(len(row), np.int64)
    seen = np.zeros(rows, np.int64)
    for i, r in enumerate(row):
        seen[r] += 1
        segment[i] = seen[r]

    def empty(like, length):
        return np.zeros((rows, length), like.dtype)

    packed = {
        "encoder_token_ids": empty(arrays["encoder_token_ids"], encoder_length),
        "encoder_padding_mask": empty(arrays["encoder_padding_mask"], encoder_length),
        "decoder_token_ids": empty(arrays["decoder_token_ids"], decoder_length),
        "decoder_padding_mask": empty(arrays["decoder_padding_mask"], decoder_length),
        "encoder_segment_ids": np.zeros((rows, encoder_length), np.int32),
        "decoder_segment_ids": np.zeros((rows, decoder_length), np.int32),
    }
    packed_targets = {name: empty(value, decoder_length) for name, value in targets.items()}
    for i in range(len(row)):
        r = row[i]
        encoder = slice(start_encoder[i], start_encoder[i] + encoder_lengths[i])
        decoder = slice(start_decoder[i], start_decoder[i] + decoder_lengths[i])
        for key in ENCODER_KEYS:
            packed[key][r, encoder] = arrays[key][i, : encoder_lengths[i]]
        for key in DECODER_KEYS:
            packed[key][r, decoder] = arrays[key][i, : decoder_lengths[i]]
        packed["encoder_segment_ids"][r, encoder] = segment[i]
        packed["decoder_segment_ids"][r, decoder] = segment[i]
        for name, value in targets.items():
            packed_targets[name][r, decoder] = value[i, : decoder_lengths[i]]
    return packed, packed_targets.get("y"), packed_targets.get("sample_weight")


def padding_fraction(padding_mask):
    """The fraction of positions that are padding, for `(N, L)` masks."""
    mask = np.asarray(padding_mask).astype(bool)
    return 1.0 - mask.mean() if mask.size else 0.0


def pack_batches(chunks, rows, max_segments=None):
    """Batches of exactly `rows` packed rows from a stream of preprocessed examples, in the stream's order.

    Each batch takes the next examples in order, greedy first fit into its
    `rows` rows; the first example that fits none of them starts the next
    batch. A batch thus holds a run of consecutive examples, and the count
    of examples that the batches so far hold says where the next batch
    starts: a stream resumed at that count packs the same batches again.
    Rows a batch leaves empty are all padding with zero weights (the last
    batch's, mostly), so that every step has one shape.

    Args:
        chunks: iterable of `(x, y, sample_weight)`, each some examples one
            per row as `pack_examples` takes them, all of the same widths
            (the packed rows' lengths).
        rows: int, rows per batch.
        max_segments: optional int, at most this many examples per row.

    Yields:
        `(x, y, sample_weight, consumed)`: a batch as `pack_examples` gives
        it, padded to `rows` rows, and how many examples of `chunks` the
        batches so far hold.

    Example:
    >>> def chunk(encoder_lengths):
    ...     mask = (np.arange(4)[None] < np.array(encoder_lengths)[:, None]).astype("int32")
    ...     x = {"encoder_token_ids": mask * 5, "encoder_padding_mask": mask,
    ...          "decoder_token_ids": mask[:, :2] * 7, "decoder_padding_mask": mask[:, :2]}
    ...     return x, mask[:, :2] * 8, mask[:, :2].astype("float32")
    >>> [(x["encoder_segment_ids"].tolist(), consumed) for x, _, _, consumed in pack_batches([chunk([1, 1, 3])], 1)]
    [([[1, 2, 0, 0]], 2), ([[1, 1, 1, 0]], 3)]
    """
    if rows < 1:
        raise ValueError(f"a batch needs at least one row; got rows={rows}")
    limit = max_segments or np.iinfo(np.int64).max
    # The examples of the batch being filled, and the room left in each of its rows opened so far.
    pending, consumed = [], 0
    encoder_room, decoder_room, segments = (np.zeros(0, np.int64) for _ in range(3))
    widths = None

    def batch():
        stacked = [np.concatenate(parts) for parts in zip(*pending)]
        x = dict(zip(ENCODER_KEYS + DECODER_KEYS, stacked[:4]))
        packed, y, weights = pack_examples(x, stacked[4], stacked[5], widths[0], widths[1], max_segments)
        padded = [np.pad(a, [(0, rows - len(a)), (0, 0)]) for a in (*packed.values(), y, weights)]
        return dict(zip(packed, padded[:-2])), padded[-2], padded[-1]

    for x, y, sample_weight in chunks:
        arrays = [np.asarray(keras.ops.convert_to_numpy(x[key])) for key in ENCODER_KEYS + DECODER_KEYS]
        y = np.asarray(keras.ops.convert_to_numpy(y))
        weights = np.ones(y.shape, "float32") if sample_weight is None else keras.ops.convert_to_numpy(sample_weight)
        if widths is None:
            widths = (arrays[0].shape[1], arrays[2].shape[1])
        elif widths != (arrays[0].shape[1], arrays[2].shape[1]):
            raise ValueError(
                f"every chunk must have the widths {widths}; got {(arrays[0].shape[1], arrays[2].shape[1])}"
            )
        encoder_lengths = _lengths(arrays[1], "encoder_padding_mask")
        decoder_lengths = _lengths(arrays[3], "decoder_padding_mask")
        for i in range(len(y)):
            fits = (encoder_room >= encoder_lengths[i]) & (decoder_room >= decoder_lengths[i]) & (segments < limit)
            if not fits.any() and len(encoder_room) == rows:
                consumed += len(pending)
                yield (*batch(), consumed)
                pending = []
                encoder_room, decoder_room, segments = (np.zeros(0, np.int64) for _ in range(3))
                fits = fits[:0]
            if fits.any():
                r = int(np.flatnonzero(fits)[0])
            else:
                r = len(encoder_room)
                encoder_room = np.append(encoder_room, widths[0])
                decoder_room = np.append(decoder_room, widths[1])
                segments = np.append(segments, 0)
            encoder_room[r] -= encoder_lengths[i]
            decoder_room[r] -= decoder_lengths[i]
            segments[r] += 1
            pending.append([a[i : i + 1] for a in arrays] + [y[i : i + 1], weights[i : i + 1]])
    if pending:
        consumed += len(pending)
        yield (*batch(), consumed)
