"""Blockwise (linear-memory) attention: the same numbers as the dense path and the reference.

`blockwise_settings(min_logits=0, block_size=4)` forces the blockwise path at
tiny sizes, and a small `step_logits` makes full layers walk several key
blocks, so windows, padding and the loop all cross block edges.
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import assert_matches_reference
from hf_reference import backbone_from_reference
from hf_reference import random_batch
from hf_reference import reference_model
from hf_reference import reference_outputs
from test_backbone_parity import CONFIGS

from keras_t5gemma.layers import attention as attention_module
from keras_t5gemma.layers.attention import grouped_attention
from keras_t5gemma.layers.blockwise_attention import blockwise_attention
from keras_t5gemma.layers.blockwise_attention import blockwise_settings
from keras_t5gemma.layers.feedforward import FeedForward
from keras_t5gemma.layers.masks import AttentionMask
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

FORCED = {"min_logits": 0, "block_size": 4, "step_logits": 64}
JAX_ONLY = pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX gradients and jaxprs")


@pytest.fixture
def count_blockwise(monkeypatch):
    """Counts `blockwise_attention` calls made by `Attention`."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return blockwise_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "blockwise_attention", counted)
    return calls


def _tensors(rng, batch, queries, keys, heads, kv_heads, size=8):
    query = rng.normal(size=(batch, queries, heads, size)).astype("float32")
    key = rng.normal(size=(batch, keys, kv_heads, size)).astype("float32")
    value = rng.normal(size=(batch, keys, kv_heads, size)).astype("float32")
    return query, key, value


CASES = {
    # name: (causal, window, kv heads, soft cap, cross keys, block)
    "encoder_window5_gqa2": (False, 5, 2, None, 0, 4),
    "encoder_window4_block3": (False, 4, 4, 1.5, 0, 3),
    "encoder_full": (False, None, 1, None, 0, 4),
    "decoder_window3_cross": (True, 3, 2, None, 13, 4),
    "decoder_full_cross_softcap": (True, None, 1, 2.0, 9, 5),
}
SMOKE_CASES = {"encoder_window5_gqa2", "decoder_window3_cross"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.backend_smoke] if n in SMOKE_CASES else []) for n in CASES],
)
def test_blockwise_attention_equals_dense(name, rng):
    causal, window, kv_heads, soft_cap, cross_length, block = CASES[name]
    length = 23
    query, key, value = _tensors(rng, 2, length, length, 4, kv_heads)
    padding = np.ones((2, length), "int32")
    padding[1, 17:] = 0
    cross = None
    cross_padding = None
    if cross_length:
        _, cross_key, cross_value = _tensors(rng, 2, 1, cross_length, 4, kv_heads)
        cross = (cross_key, cross_value)
        cross_padding = np.ones((2, cross_length), "int32")
        cross_padding[0, cross_length - 4 :] = 0
    positions = np.arange(length, dtype="int32")
    mask = AttentionMask(
        positions,
        positions,
        causal=causal,
        sliding_window=window,
        key_padding_mask=padding,
        cross_padding_mask=cross_padding,
        aligned=True,
    )
    all_keys = key if cross is None else np.concatenate([key, cross[0]], axis=1)
    all_values = value if cross is None else np.concatenate([value, cross[1]], axis=1)
    dense = grouped_attention(query, all_keys, all_values, mask.dense(), 0.3, soft_cap)
    with blockwise_settings(block_size=block, step_logits=64):
        blockwise = blockwise_attention(query, key, value, mask, 0.3, soft_cap, cross)
        two_pass = blockwise_attention(query, key, value, mask, 0.3, soft_cap, cross, training=True)
    real = padding.astype(bool)
    np.testing.assert_allclose(np.asarray(blockwise)[real], np.asarray(dense)[real], atol=2e-6)
    np.testing.assert_allclose(np.asarray(two_pass)[real], np.asarray(dense)[real], atol=2e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_cached_step_walks_the_cache_blockwise(window, rng):
    """Queries at positions 7..11 against a 16-slot cache and encoder keys, as in generation."""
    query, key, value = _tensors(rng, 2, 5, 16, 4, 2)
    _, cross_key, cross_value = _tensors(rng, 2, 1, 11, 4, 2)
    cross_padding = np.ones((2, 11), "int32")
    cross_padding[1, 6:] = 0
    mask = AttentionMask(
        7 + np.arange(5, dtype="int32"),
        np.arange(16, dtype="int32"),
        causal=True,
        sliding_window=window,
        cross_padding_mask=cross_padding,
    )
    dense = grouped_attention(
        query,
        np.concatenate([key, cross_key], axis=1),
        np.concatenate([value, cross_value], axis=1),
        mask.dense(),
        0.3,
    )
    with blockwise_settings(block_size=2, step_logits=16):
        blockwise = blockwise_attention(query, key, value, mask, 0.3, None, (cross_key, cross_value))
    np.testing.assert_allclose(np.asarray(blockwise), np.asarray(dense), atol=2e-6)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="block_size"):
        with blockwise_settings(block_size=0):
            pass


def _backbone_pair(name):
    config = CONFIGS[name]
    model = reference_model(config, seed=len(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = backbone_from_reference(model, config)
    return model, backbone


def _run(backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask):
    outputs = backbone(
        {
            "encoder_token_ids": encoder_ids.astype("int32"),
            "encoder_padding_mask": encoder_mask.astype("int32"),
            "decoder_token_ids": decoder_ids.astype("int32"),
            "decoder_padding_mask": decoder_mask.astype("int32"),
        }
    )
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    return keras.ops.convert_to_numpy(outputs["encoder_sequence_output"]), keras.ops.convert_to_numpy(logits)


@pytest.mark.parametrize(
    "name",
    [
        "gqa2_window4",
        pytest.param("gqa4_softcap_window3", marks=pytest.mark.backend_smoke),
        "uneven_depth_window1",
    ],
)
def test_blockwise_backbone_matches_reference(name, rng, count_blockwise):
    model, backbone = _backbone_pair(name)
    batch = random_batch(rng, 2, [23, 14], [11, 6], encoder_length=23, decoder_length=11)
    reference_encoder, reference_logits = reference_outputs(model, *batch)
    with blockwise_settings(**FORCED):
        encoder, logits = _run(backbone, *batch)
    layers = len(CONFIGS[name]["encoder"]["text_config"]["layer_types"]) + len(CONFIGS[name]["decoder"]["layer_types"])
    assert len(count_blockwise) == layers
    encoder_mask, decoder_mask = batch[1], batch[3]
    assert_matches_reference(encoder, reference_encoder, encoder_mask[..., None].repeat(encoder.shape[-1], -1))
    assert_matches_reference(logits, reference_logits, decoder_mask[..., None].repeat(logits.shape[-1], -1))


@pytest.fixture(scope="module")
def tiny_pair():
    return _backbone_pair("gqa2_window4")


def _gradients(backbone, inputs, weights):
    import jax

    def loss(trainable):
        outputs, _ = backbone.stateless_call(trainable, backbone.non_trainable_variables, inputs, training=True)
        hidden = outputs["decoder_sequence_output"]
        return (hidden * weights["decoder"]).sum() + (outputs["encoder_sequence_output"] * weights["encoder"]).sum()

    trainable = [v.value for v in backbone.trainable_variables]
    return jax.jit(jax.grad(loss))(trainable)


@JAX_ONLY
def test_blockwise_rematerialised_gradients_equal_dense(tiny_pair, rng):
    _, backbone = tiny_pair
    encoder_ids, encoder_mask, decoder_ids, decoder_mask = random_batch(
        rng, 2, [23, 14], [11, 6], encoder_length=23, decoder_length=11
    )
    inputs = {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids.astype("int32"),
        "decoder_padding_mask": decoder_mask.astype("int32"),
    }
    hidden = backbone.hidden_dim
    weights = {
        "encoder": rng.normal(size=(2, 23, hidden)).astype("float32") * encoder_mask[..., None],
        "decoder": rng.normal(size=(2, 11, hidden)).astype("float32") * decoder_mask[..., None],
    }
    dense = _gradients(backbone, inputs, weights)
    rematerialised = T5Gemma2Backbone.from_config({**backbone.get_config(), "remat": True})
    rematerialised.set_weights(backbone.get_weights())
    assert rematerialised.get_config()["remat"] is True
    with blockwise_settings(**FORCED):
        blockwise = _gradients(rematerialised, inputs, weights)
    for variable, expected, got in zip(backbone.trainable_variables, dense, blockwise):
        scale = float(np.abs(expected).max()) or 1.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5 * scale, err_msg=variable.path)


def _largest_intermediate(jaxpr):
    largest = 0
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            largest = max(largest, int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
        for parameter in equation.params.values():
            for inner in parameter if isinstance(parameter, (tuple, list)) else [parameter]:
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


@JAX_ONLY
def test_no_intermediate_grows_with_the_square_of_the_length(tiny_pair):
    """Tracing a 1,024-token encoder+decoder pass and its gradient: nothing near `T x S` elements exists."""
    import jax

    _, backbone = tiny_pair
    length = 1024
    inputs = {
        "encoder_token_ids": np.ones((1, length), "int32"),
        "encoder_padding_mask": np.ones((1, length), "int32"),
        "decoder_token_ids": np.ones((1, length), "int32"),
        "decoder_padding_mask": np.ones((1, length), "int32"),
    }

    trainable = [v.value for v in backbone.trainable_variables]

    def largest(gradient=False):
        # A new function each time: JAX caches traces by function.
        def forward(trainable):
            outputs = backbone.stateless_call(trainable, backbone.non_trainable_variables, inputs, training=gradient)[0]
            return sum(output.sum() for output in outputs.values())

        return _largest_intermediate(jax.make_jaxpr(jax.grad(forward) if gradient else forward)(trainable).jaxpr)

    dense_logits = backbone.encoder_num_attention_heads * length * length
    with blockwise_settings(min_logits=0, block_size=16, step_logits=2**16):
        blockwise = largest()
        blockwise_gradient = largest(gradient=True)
    dense = largest()
    assert dense >= dense_logits
    assert blockwise <= dense_logits // 8, (blockwise, dense_logits)
    # The backward pass recomputes each loop step instead of stacking them.
    assert blockwise_gradient <= dense_logits // 8, (blockwise_gradient, dense_logits)


def test_generate_after_a_blockwise_encoding_matches_dense(tiny_pair, rng, count_blockwise):
    """Greedy tokens after a 40-token input, with every attention blockwise (cached steps too)."""
    _, backbone = tiny_pair
    encoder_ids, encoder_mask, _, _ = random_batch(rng, 2, [40, 27], [1, 1], encoder_length=40, decoder_length=1)
    decoder_ids = np.zeros((2, 13), "int32")
    decoder_ids[:, 0] = 2
    decoder_mask = np.zeros((2, 13), "int32")
    decoder_mask[:, 0] = 1
    inputs = {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": decoder_mask,
    }
    dense_lm = T5Gemma2Seq2SeqLM(backbone)
    dense_lm.compile(sampler="greedy")
    expected = dense_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    with blockwise_settings(**FORCED):
        blockwise_lm = T5Gemma2Seq2SeqLM(backbone)
        blockwise_lm.compile(sampler="greedy")
        tokens = blockwise_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    assert count_blockwise  # traced through the blockwise path
    np.testing.assert_array_equal(tokens, expected)
    assert len(np.unique(expected)) > 4


def test_feedforward_chunks_equal_one_piece(rng):
    """The feed-forward block on 21 tokens in 7 chunks of 3 against its formula on all tokens at once."""
    feedforward = FeedForward(32)
    x = rng.normal(size=(3, 7, 8)).astype("float32")
    feedforward.build(x.shape)
    gate_up = keras.ops.convert_to_numpy(feedforward.gate_up_dense.kernel)
    gate, up, down = gate_up[:, 0], gate_up[:, 1], keras.ops.convert_to_numpy(feedforward.down_dense.kernel)

    def gelu(h):
        return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))

    expected = (gelu(x @ gate) * (x @ up)) @ down
    with blockwise_settings(feedforward_tokens=3):
        chunked = keras.ops.convert_to_numpy(feedforward(x))
    np.testing.assert_allclose(chunked, expected, atol=1e-5 * np.abs(expected).max())


def test_feedforward_chunks_in_the_backbone_match_reference(rng, tiny_pair, monkeypatch):
    """Encoder and decoder with feed-forward chunks of 16 tokens (46 and 22 per batch) against `transformers`."""
    model, backbone = tiny_pair
    pieces = []
    feed = FeedForward._feed

    def counted(self, x, training):
        pieces.append(x.shape[0] * x.shape[1])  # `(1, chunk, D)` per chunk
        return feed(self, x, training)

    monkeypatch.setattr(FeedForward, "_feed", counted)
    batch = random_batch(rng, 2, [23, 14], [11, 6], encoder_length=23, decoder_length=11)
    reference_encoder, reference_logits = reference_outputs(model, *batch)
    with blockwise_settings(feedforward_tokens=16):
        encoder, logits = _run(backbone, *batch)
    assert 16 in pieces and 14 in pieces  # the encoder's 46 tokens in chunks of 16, 16, 14
    encoder_mask, decoder_mask = batch[1], batch[3]
    assert_matches_reference(encoder, reference_encoder, encoder_mask[..., None].repeat(encoder.shape[-1], -1))
    assert_matches_reference(logits, reference_logits, decoder_mask[..., None].repeat(logits.shape[-1], -1))
