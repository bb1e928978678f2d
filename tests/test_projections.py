"""The projection layers compute what Keras' own compute, on the one-row fast path too."""

import keras
import numpy as np
import pytest

from keras_t5gemma.layers.projections import Dense
from keras_t5gemma.layers.projections import EinsumDense
from keras_t5gemma.layers.projections import ReversibleEmbedding

# (ours, Keras' own, input shape of one row, call arguments)
CASES = {
    "dense": (lambda: Dense(24), lambda: keras.layers.Dense(24), (1, 1, 16), {}),
    "einsum": (
        lambda: EinsumDense("btnv,nvd->btd", output_shape=(None, 24)),
        lambda: keras.layers.EinsumDense("btnv,nvd->btd", output_shape=(None, 24)),
        (1, 1, 2, 8),
        {},
    ),
    "reverse": (
        lambda: ReversibleEmbedding(40, 16, logit_soft_cap=3.0),
        lambda: keras.layers.ReversibleEmbedding(40, 16, logit_soft_cap=3.0),
        (1, 16),
        {"reverse": True},
    ),
}


def _pair(case, dtype, quantize):
    ours_factory, keras_factory, shape, kwargs = CASES[case]
    ours, theirs = ours_factory(), keras_factory()
    ours.dtype_policy = theirs.dtype_policy = dtype
    build_shape = (1, 1) if case == "reverse" else shape
    ours.build(build_shape)
    theirs.build(build_shape)
    rng = np.random.default_rng(0)
    for ours_weight, their_weight in zip(ours.weights, theirs.weights):
        value = rng.normal(0, 0.5, ours_weight.shape).astype("float32")
        ours_weight.assign(value)
        their_weight.assign(value)
    if quantize:
        ours.quantize("int8")
        theirs.quantize("int8", type_check=False)
    return ours, theirs, shape, kwargs


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,quantize", [("float32", False), ("float32", True), ("bfloat16", False)])
def test_one_row_matches_keras_and_the_row_of_a_batch(case, dtype, quantize):
    ours, theirs, shape, kwargs = _pair(case, dtype, quantize)
    rng = np.random.default_rng(1)
    row = rng.normal(size=shape).astype("float32")
    batch = np.concatenate([row, rng.normal(size=shape).astype("float32")])
    one = keras.ops.convert_to_numpy(keras.ops.cast(ours(row, **kwargs), "float32"))
    in_batch = keras.ops.convert_to_numpy(keras.ops.cast(ours(batch, **kwargs), "float32"))[:1]
    reference = keras.ops.convert_to_numpy(keras.ops.cast(theirs(row, **kwargs), "float32"))
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(one, in_batch, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(one, reference, rtol=tolerance, atol=tolerance * np.abs(reference).max())


def test_one_row_of_int8_runs_as_two_rows_on_jax_cpu():
    jax = pytest.importorskip("jax")
    if keras.config.backend() != "jax" or jax.default_backend() != "cpu":
        pytest.skip("the two-row path is for XLA CPU")
    layer = Dense(24)
    layer.build((1, 1, 16))
    layer.quantize("int8")
    compiled = jax.jit(lambda x: layer(x)).lower(np.ones((1, 1, 16), "float32")).compile().as_text()
    assert "s8[2,1,16]" in compiled.replace(" ", "") or "s8[2,16]" in compiled.replace(" ", ""), compiled


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "lora", "int8"])
def test_some_parts_of_a_fused_projection_compute_as_the_whole_does(mode):
    """`call_parts` (the decoder's keys and values of the encoder output) against the whole product's slice."""
    from keras_t5gemma.layers.projections import FusedEinsumDense

    layer = FusedEinsumDense(
        "btd,dnh->btnh",
        (None, 7, 3),
        parts=("query_dense", "key_dense", "value_dense"),
        part_sizes=(3, 2, 2),
        bias_axes="nh",
        bias_initializer="random_normal",
        dtype="bfloat16" if mode == "bfloat16" else "float32",
    )
    inputs = np.random.default_rng(0).standard_normal((2, 5, 8)).astype("float32")
    layer.build(inputs.shape)
    if mode == "lora":
        layer.enable_lora(2)
        layer.lora_kernel_b.assign(np.ones(layer.lora_kernel_b.shape, "float32"))  # the adapter changes the kernel
    if mode == "int8":
        layer.quantize("int8")
    assert layer.part_span(1, 2) == (3, 7) and layer.part_span(0) == (0, 3)
    whole = keras.ops.convert_to_numpy(keras.ops.cast(layer(inputs), "float32"))
    for first, last in [(0, 0), (1, 2), (2, 2)]:
        start, stop = layer.part_span(first, last)
        parts = keras.ops.convert_to_numpy(keras.ops.cast(layer.call_parts(inputs, first, last), "float32"))
        tolerance = 1e-2 if mode == "bfloat16" else 1e-6
        np.testing.assert_allclose(parts, whole[:, :, start:stop], rtol=tolerance, atol=tolerance)
