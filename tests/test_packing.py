"""Packing: several examples in one encoder row and one decoder row, computing what each computes alone.

The reference is the same model on the same examples padded one per row (the
unpacked path, itself checked against `transformers` in the parity tests):
each segment's logits, the loss over target tokens and every gradient must
agree within float32 rounding, on the dense path (JAX's fused attention; the
`backend_smoke` tests also run on TensorFlow and torch, see
`test_other_backends.py`) and the blockwise long-input path.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_t5gemma.layers.blockwise_attention import blockwise_settings
from keras_t5gemma.layers.masks import segment_positions
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.training.packing import first_fit
from keras_t5gemma.training.packing import pack_batches
from keras_t5gemma.training.packing import pack_examples
from keras_t5gemma.training.packing import token_mean_loss

VOCABULARY = 64
# Encoder and decoder tokens of each example: longer than the sliding window
# (4), so windows, causality and segment edges all bound what a token sees.
ENCODER_LENGTHS = (5, 9, 3, 7, 4, 6)
DECODER_LENGTHS = (3, 5, 2, 6, 4, 3)


@pytest.fixture(scope="module")
def seq_2_seq_lm():
    keras.utils.set_random_seed(7)
    backbone = T5Gemma2Backbone(
        vocabulary_size=VOCABULARY,
        encoder_hidden_dim=16,
        encoder_intermediate_dim=32,
        encoder_num_layers=2,
        encoder_num_attention_heads=2,
        encoder_num_key_value_heads=1,
        encoder_head_dim=8,
        encoder_layer_types=["sliding_attention", "full_attention"],
        decoder_hidden_dim=16,
        decoder_intermediate_dim=32,
        decoder_num_layers=2,
        decoder_num_attention_heads=2,
        decoder_num_key_value_heads=1,
        decoder_head_dim=8,
        decoder_layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        eoi_token_index=VOCABULARY - 2,
        image_token_index=VOCABULARY - 1,
    )
    return T5Gemma2Seq2SeqLM(backbone)


@pytest.fixture(scope="module")
def examples():
    """Unpacked (one example per row, right-padded) `(x, y, sample_weight)`, as the preprocessor gives them."""
    rng = np.random.default_rng(3)
    count = len(ENCODER_LENGTHS)
    x = {
        "encoder_token_ids": np.zeros((count, max(ENCODER_LENGTHS)), "int32"),
        "encoder_padding_mask": np.zeros((count, max(ENCODER_LENGTHS)), "int32"),
        "decoder_token_ids": np.zeros((count, max(DECODER_LENGTHS)), "int32"),
        "decoder_padding_mask": np.zeros((count, max(DECODER_LENGTHS)), "int32"),
    }
    y = np.zeros((count, max(DECODER_LENGTHS)), "int32")
    weights = np.zeros((count, max(DECODER_LENGTHS)), "float32")
    for i, (encoder, decoder) in enumerate(zip(ENCODER_LENGTHS, DECODER_LENGTHS)):
        x["encoder_token_ids"][i, :encoder] = rng.integers(1, VOCABULARY - 2, encoder)
        x["encoder_padding_mask"][i, :encoder] = 1
        x["decoder_token_ids"][i, :decoder] = rng.integers(1, VOCABULARY - 2, decoder)
        x["decoder_padding_mask"][i, :decoder] = 1
        y[i, :decoder] = rng.integers(1, VOCABULARY - 2, decoder)
        # As the preprocessor: the last decoder input has no next token.
        weights[i, : decoder - 1] = 1.0
    return x, y, weights


def _packed(examples):
    """The examples packed as a stream packs them: one batch of a fixed number of rows, the last one left empty
    (all padding, zero weights), which must change nothing."""
    rows = len(pack_examples(*examples, encoder_length=16, decoder_length=10)[1]) + 1
    x, y, weights = examples
    widths = {"encoder": 16, "decoder": 10}
    x = {key: np.pad(value, [(0, 0), (0, widths[key.split("_")[0]] - value.shape[1])]) for key, value in x.items()}
    y, weights = (np.pad(value, [(0, 0), (0, 10 - value.shape[1])]) for value in (y, weights))
    (batch,) = pack_batches([(x, y, weights)], rows)
    assert batch[3] == len(y) and not batch[0]["encoder_padding_mask"][-1].any()
    return batch[:3]


def _where(packed_x, count):
    """`(row, decoder columns)` of each example in packed rows (from the segment ids)."""
    places = []
    segment_ids = packed_x["decoder_segment_ids"]
    for row in range(len(segment_ids)):
        for segment in range(1, segment_ids[row].max() + 1):
            places.append((row, np.flatnonzero(segment_ids[row] == segment)))
    assert len(places) == count
    return places


def _examples_in_packed_order(examples, packed_x):
    """The original example of each packed segment, found by matching its encoder tokens."""
    x = examples[0]
    order = []
    for row in range(len(packed_x["encoder_segment_ids"])):
        segments = packed_x["encoder_segment_ids"][row]
        for segment in range(1, segments.max() + 1):
            tokens = packed_x["encoder_token_ids"][row][segments == segment]
            match = [
                i
                for i in range(len(ENCODER_LENGTHS))
                if ENCODER_LENGTHS[i] == len(tokens)
                and np.array_equal(x["encoder_token_ids"][i, : len(tokens)], tokens)
            ]
            order.append(match[0])
    return order


def _forward_and_backward(model, x, y, weights, chunked=False):
    """Logits, the token-mean LM loss and its gradient to every trainable variable, on the current backend.

    On JAX one compiled function gives all three (op-by-op JAX is slow);
    `chunked` takes the loss from `fit`'s chunked path instead (no logits).
    """
    loss_function = token_mean_loss()
    variables = model.trainable_variables
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable):
            if chunked:
                loss, _ = model.compute_loss_and_updates(trainable, non_trainable, [], x, y, weights)
                return loss, None
            logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_function(y, logits, weights), logits

        (loss, logits), gradients = jax.jit(jax.value_and_grad(loss_of, has_aux=True))([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_function(y, logits, weights)
        gradients = tape.gradient(loss, variables)
    else:
        for variable in variables:
            # Gradients accumulate into `.grad`: start each pass from none.
            variable.value.grad = None
        logits = model(x, training=True)
        loss = loss_function(y, logits, weights)
        loss.backward()
        gradients = [variable.value.grad.detach().clone() for variable in variables]
    logits = None if logits is None else np.asarray(ops.convert_to_numpy(logits))
    return logits, float(ops.convert_to_numpy(loss)), [np.asarray(ops.convert_to_numpy(g)) for g in gradients]


@pytest.fixture(scope="module")
def unpacked(seq_2_seq_lm, examples):
    return _forward_and_backward(seq_2_seq_lm, *examples)


def _check_logits(unpacked_logits, packed_logits, examples):
    packed_x, _, _ = _packed(examples)
    scale = np.abs(unpacked_logits).max()
    order = _examples_in_packed_order(examples, packed_x)
    for (row, columns), example in zip(_where(packed_x, len(order)), order):
        np.testing.assert_allclose(
            packed_logits[row, columns], unpacked_logits[example, : len(columns)], rtol=0, atol=1e-5 * scale
        )


def _check_loss_and_gradients(seq_2_seq_lm, unpacked, packed):
    _, loss, gradients = unpacked
    _, packed_loss, packed_gradients = packed
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    for variable, expected, got in zip(seq_2_seq_lm.trainable_variables, gradients, packed_gradients):
        scale = max(np.abs(expected).max(), 1e-6)
        # Sums over differently laid-out tokens: float32 rounding of the largest entry.
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale, err_msg=variable.path)


@pytest.mark.backend_smoke
def test_packed_logits_loss_and_gradients_equal_the_padded_ones(seq_2_seq_lm, examples, unpacked):
    packed = _forward_and_backward(seq_2_seq_lm, *_packed(examples))
    assert len(_packed(examples)[0]["encoder_token_ids"]) < len(ENCODER_LENGTHS)
    _check_logits(unpacked[0], packed[0], examples)
    _check_loss_and_gradients(seq_2_seq_lm, unpacked, packed)


def test_without_segment_ids_packed_examples_would_mix(seq_2_seq_lm, examples, unpacked):
    # The check the test above makes can fail: the same rows without
    # segment ids do not give each example's logits.
    packed_x, packed_y, packed_weights = _packed(examples)
    mixed_x = {**packed_x, "encoder_segment_ids": None, "decoder_segment_ids": None}
    mixed = _forward_and_backward(seq_2_seq_lm, mixed_x, packed_y, packed_weights)
    with pytest.raises(AssertionError):
        _check_logits(unpacked[0], mixed[0], examples)


def test_blockwise_path_honours_segments(seq_2_seq_lm, examples, unpacked):
    # Every attention call blockwise, in blocks of 4 (sliding layers: band of
    # neighbouring blocks; full layers and encoder keys: walked key blocks),
    # with the two-pass training softmax.
    with blockwise_settings(min_logits=0, block_size=4, step_logits=64):
        packed = _forward_and_backward(seq_2_seq_lm, *_packed(examples))
    _check_logits(unpacked[0], packed[0], examples)
    _check_loss_and_gradients(seq_2_seq_lm, unpacked, packed)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="the chunked loss runs on JAX only")
def test_chunked_loss_counts_target_tokens_as_unpacked(seq_2_seq_lm, examples, unpacked):
    seq_2_seq_lm.compile(loss=token_mean_loss())
    seq_2_seq_lm.loss_chunk_tokens = 7
    try:
        packed_x, packed_y, packed_weights = _packed(examples)
        assert seq_2_seq_lm._runs_chunked_loss(ops.convert_to_tensor(packed_y), ops.convert_to_tensor(packed_weights))
        packed = _forward_and_backward(seq_2_seq_lm, packed_x, packed_y, packed_weights, chunked=True)
    finally:
        seq_2_seq_lm.loss_chunk_tokens = None
    _check_loss_and_gradients(seq_2_seq_lm, unpacked, packed)


def test_segment_positions_restart_at_each_segment():
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [2, 2, 1, 1, 1, 0, 0, 0]])
    expected = []
    for row in segment_ids:
        positions = []
        for i, segment in enumerate(row):
            positions.append(positions[-1] + 1 if i and row[i - 1] == segment else 0)
        expected.append(positions)
    got = ops.convert_to_numpy(segment_positions(ops.convert_to_tensor(segment_ids)))
    assert got.tolist() == expected


def _first_fit_by_hand(encoder_lengths, decoder_lengths, encoder_length, decoder_length):
    rows = []  # [encoder used, decoder used]
    placed = []
    for encoder, decoder in zip(encoder_lengths, decoder_lengths):
        for index, used in enumerate(rows):
            if used[0] + encoder <= encoder_length and used[1] + decoder <= decoder_length:
                break
        else:
            index = len(rows)
            rows.append([0, 0])
        placed.append((index, rows[index][0], rows[index][1]))
        rows[index][0] += encoder
        rows[index][1] += decoder
    return placed


def test_first_fit_places_each_example_in_the_first_row_with_room():
    rng = np.random.default_rng(0)
    encoder_lengths = np.minimum(rng.lognormal(np.log(10), 0.8, 300).astype(int) + 1, 64)
    decoder_lengths = np.minimum(rng.lognormal(np.log(5), 0.8, 300).astype(int) + 1, 16)
    row, start_encoder, start_decoder = first_fit(encoder_lengths, decoder_lengths, 64, 16)
    assert list(zip(row, start_encoder, start_decoder)) == _first_fit_by_hand(encoder_lengths, decoder_lengths, 64, 16)
    row, _, _ = first_fit(encoder_lengths, decoder_lengths, 64, 16, max_segments=2)
    assert np.bincount(row).max() == 2


def test_pack_examples_keeps_every_token_label_and_weight(examples):
    x, y, weights = examples
    packed_x, packed_y, packed_weights = _packed(examples)
    order = _examples_in_packed_order(examples, packed_x)
    assert sorted(order) == list(range(len(ENCODER_LENGTHS)))
    for (row, columns), example in zip(_where(packed_x, len(order)), order):
        length = len(columns)
        assert length == DECODER_LENGTHS[example]
        np.testing.assert_array_equal(
            packed_x["decoder_token_ids"][row, columns], x["decoder_token_ids"][example, :length]
        )
        np.testing.assert_array_equal(packed_y[row, columns], y[example, :length])
        np.testing.assert_array_equal(packed_weights[row, columns], weights[example, :length])
    for key in ("encoder_padding_mask", "decoder_padding_mask"):
        segments = packed_x[key.replace("padding_mask", "segment_ids")]
        np.testing.assert_array_equal(packed_x[key], (segments > 0).astype(packed_x[key].dtype))
    assert packed_weights.sum() == weights.sum()


def test_pack_examples_refuses_what_it_cannot_pack(examples):
    x, y, weights = examples
    with pytest.raises(ValueError, match="Example 1 has 9 encoder tokens, more than a row's 8"):
        pack_examples(x, y, weights, encoder_length=8)
    left_padded = {**x, "encoder_padding_mask": x["encoder_padding_mask"][:, ::-1]}
    with pytest.raises(ValueError, match="`encoder_padding_mask` of example 0 is not right-padded"):
        pack_examples(left_padded)
    with pytest.raises(ValueError, match="lacks \\['decoder_padding_mask'\\]"):
        pack_examples({k: v for k, v in x.items() if k != "decoder_padding_mask"})
    late_weights = weights.copy()
    late_weights[2, -1] = 1.0
    with pytest.raises(ValueError, match="Example 2 has label weights past its 2 decoder tokens"):
        pack_examples(x, y, late_weights)


def test_a_packed_decoder_needs_both_segment_inputs(seq_2_seq_lm):
    hidden = np.zeros((1, 3, 16), "float32")
    mask = np.ones((1, 3), "int32")
    with pytest.raises(ValueError, match="needs both `segment_ids`"):
        seq_2_seq_lm.backbone.decoder(hidden, mask, hidden, mask, segment_ids=mask)


def _lengths_chunk(encoder_lengths, decoder_lengths, first_id=0, encoder_width=16, decoder_width=8):
    """Preprocessed-like examples of the given lengths; example `k`'s tokens are all `first_id + k + 1`."""
    count = len(encoder_lengths)
    ids = np.arange(first_id + 1, first_id + count + 1, dtype="int32")[:, None]
    encoder_mask = (np.arange(encoder_width)[None] < np.asarray(encoder_lengths)[:, None]).astype("int32")
    decoder_mask = (np.arange(decoder_width)[None] < np.asarray(decoder_lengths)[:, None]).astype("int32")
    x = {
        "encoder_token_ids": encoder_mask * ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_mask * ids,
        "decoder_padding_mask": decoder_mask,
    }
    return x, decoder_mask * ids, decoder_mask.astype("float32")


def test_pack_batches_fill_a_fixed_number_of_rows_with_the_next_examples_in_order():
    rng = np.random.default_rng(1)
    encoder_lengths = np.minimum(rng.lognormal(np.log(4), 0.8, 120).astype(int) + 1, 16)
    decoder_lengths = np.minimum(rng.lognormal(np.log(2), 0.8, 120).astype(int) + 1, 8)
    rows = 3
    whole = list(pack_batches([_lengths_chunk(encoder_lengths, decoder_lengths)], rows))
    # Chunks of any size give the same batches.
    chunks = [
        _lengths_chunk(encoder_lengths[start : start + 7], decoder_lengths[start : start + 7], first_id=start)
        for start in range(0, 120, 7)
    ]
    again = list(pack_batches(chunks, rows))
    assert len(again) == len(whole)
    for a, b in zip(whole, again):
        assert a[3] == b[3] and all(np.array_equal(a[0][key], b[0][key]) for key in a[0])
    start = 0
    for x, y, weights, consumed in whole:
        assert {len(value) for value in (*x.values(), y, weights)} == {rows}
        # The batch holds examples start..consumed, in order, as greedy first fit places them.
        ids = [
            int(t) for row, segments in zip(x["encoder_token_ids"], x["encoder_segment_ids"]) for t in row[segments > 0]
        ]
        assert sorted(set(ids)) == list(range(start + 1, consumed + 1))
        placed = _first_fit_by_hand(encoder_lengths[start:consumed], decoder_lengths[start:consumed], 16, 8)
        for k, (row, encoder_start, _) in enumerate(placed):
            length = encoder_lengths[start + k]
            assert (x["encoder_token_ids"][row, encoder_start : encoder_start + length] == start + k + 1).all()
        # A batch ends only where the next example fits none of its rows.
        if consumed < 120:
            more = _first_fit_by_hand(
                encoder_lengths[start : consumed + 1], decoder_lengths[start : consumed + 1], 16, 8
            )
            assert more[-1][0] == rows
        assert weights.sum() == decoder_lengths[start:consumed].sum()
        start = consumed
    assert start == 120


def test_fine_tune_packed_on_the_demo_data_trains_and_its_result_loads(tmp_path):
    """`fine_tune(pack=True)` end to end: the demo's pairs packed into fewer rows, the loss falls over the epochs,
    and the saved model loads back with the trained weights (the same logits)."""
    from keras_t5gemma.demo import make_examples
    from keras_t5gemma.training.fine_tune import fine_tune
    from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm

    pairs = [(example.prompt, example.target) for example in make_examples(["rotate", "reverse", "sort"], 48, seed=0)]
    lines = []
    result = fine_tune(
        pairs,
        tmp_path / "out",
        pack=True,
        epochs=3,
        batch_size=8,
        learning_rate=3e-3,
        encoder_length=32,
        decoder_length=16,
        verbose=0,
        log=lines.append,
    )
    (packed,) = [line for line in lines if line.startswith("Packed")]
    rows = int(packed.split(" into ")[1].split()[0])
    assert rows <= len(pairs) / 2, packed  # the demo's short pairs: two or more a row
    losses = result.history.history["loss"]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    loaded = load_seq_2_seq_lm(str(tmp_path / "out"))
    x, _, _ = keras.utils.unpack_x_y_sample_weight(
        loaded.preprocessor({"encoder_text": ["rotate: 1 2 3"], "decoder_text": ["2 3 1"]})
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(result.model(x)))
