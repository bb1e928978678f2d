"""Model- and data-parallel `fit` and `generate` on 8 devices match one device.

JAX fixes its device count when it starts, so the distributed tests run in a
child pytest process started with 8 virtual CPU devices
(`--xla_force_host_platform_device_count=8`; the other XLA flags only make
CPU compilation cheaper). In this process they are skipped and
`test_on_eight_virtual_devices` launches the child.

Each case builds the same tiny vision model (4 query heads, one key/value
head, as in the 270m and 1b releases) under a distribution, gives it the
single-device model's initial weights, checks every weight is laid out as
`T5Gemma2Backbone.get_layout_map` says, takes one SGD step with momentum on
the same batch and generates greedily; weights must agree with the
single-device run within 1e-5 and tokens exactly.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

CHILD = "T5GEMMA2_DISTRIBUTION_CHILD"
IN_CHILD = os.environ.get(CHILD) == "1"
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the 8-device child process")

BATCH = 8
IMAGE_TOKEN = 319
# Released head ratio (4 / 1): a model axis of 8 divides neither head count.
MODEL_KWARGS = dict(
    vocabulary_size=320,
    hidden_dim=32,
    intermediate_dim=64,
    num_heads=4,
    num_key_value_heads=1,
    head_dim=8,
    num_encoder_layers=1,
    num_decoder_layers=1,
    sliding_window=4,
    eoi_token_id=318,
    image_token_id=IMAGE_TOKEN,
)
VISION_KWARGS = dict(
    image_size=28,
    patch_size=7,
    hidden_dim=16,
    intermediate_dim=24,
    num_layers=1,
    num_heads=2,
    output_dim=32,
    mm_tokens_per_image=4,
)


def test_on_eight_virtual_devices():
    if IN_CHILD:
        pytest.skip("this is the child process")
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("JAX distribution only")
    flags = [
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
    environment = {**os.environ, CHILD: "1", "KERAS_BACKEND": "jax", "XLA_FLAGS": " ".join(flags)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed, 1 skipped", summary), summary


def _seq_2_seq_lm(lora):
    from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    vision_encoder = T5Gemma2VisionEncoder(**VISION_KWARGS, name="vision_encoder")
    backbone = T5Gemma2Backbone(**MODEL_KWARGS, vision_encoder=vision_encoder)
    if lora:
        backbone.enable_lora(2)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    seq_2_seq_lm.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), sampler="greedy")
    return seq_2_seq_lm


def _batches():
    rng = np.random.default_rng(0)
    encoder_ids = rng.integers(3, 300, (BATCH, 12)).astype("int32")
    encoder_ids[:, 2:6] = IMAGE_TOKEN  # one image per sample
    encoder = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": (np.arange(12) < rng.integers(7, 13, (BATCH, 1))).astype("int32"),
        "images": rng.normal(size=(BATCH, 1, 28, 28, 3)).astype("float32"),
    }
    train = {
        **encoder,
        "decoder_token_ids": rng.integers(3, 300, (BATCH, 6)).astype("int32"),
        "decoder_padding_mask": np.ones((BATCH, 6), "int32"),
    }
    labels = rng.integers(3, 300, (BATCH, 6)).astype("int32")
    prompt = np.zeros((BATCH, 8), "int32")
    prompt[:, 0] = 2
    generate = {**encoder, "decoder_token_ids": prompt, "decoder_padding_mask": (prompt > 0).astype("int32")}
    return train, labels, generate


def _fit_and_generate(seq_2_seq_lm, generate=True):
    train, labels, prompts = _batches()
    seq_2_seq_lm.fit(train, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    weights = {w.path: keras.ops.convert_to_numpy(w) for w in seq_2_seq_lm.weights}
    if not generate:
        return weights, None
    return weights, seq_2_seq_lm.generate(prompts, stop_token_ids=None)["decoder_token_ids"]


@pytest.fixture(scope="module")
def single_device():
    """Per LoRA setting: initial weights, weights after one step, generated tokens."""
    runs = {}

    def run(lora):
        if lora not in runs:
            keras.utils.set_random_seed(0)
            seq_2_seq_lm = _seq_2_seq_lm(lora)
            initial = seq_2_seq_lm.get_weights()
            runs[lora] = (initial, *_fit_and_generate(seq_2_seq_lm))
        return runs[lora]

    return run


def _assert_same_weights(weights, reference, initial):
    """Max abs difference to the single-device weights, which the step must have moved."""
    differences = {path: np.abs(value - reference[path]).max() for path, value in weights.items()}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-5, f"{worst}: max abs diff {differences[worst]:.3g}"
    moved = max(np.abs(reference[path] - value).max() for path, value in zip(reference, initial))
    assert moved > 1e-3, "the step changed no weight"
    return differences[worst]


def _assert_laid_out(variables, layouts, exact):
    import jax

    for variable in variables:
        layout = layouts[variable.path]
        assert layout is not None, f"no layout for {variable.path}"
        sharding = variable.value.sharding
        expected = jax.sharding.NamedSharding(
            layouts.device_mesh.backend_mesh, jax.sharding.PartitionSpec(*layout.axes)
        )
        if exact:
            assert sharding.spec == expected.spec, (variable.path, sharding.spec, layout.axes)
        else:
            # After a compiled step JAX may spell a layout differently (it
            # drops axes of size 1); it must still place the same shards.
            assert sharding.is_equivalent_to(expected, len(variable.shape)), (variable.path, sharding.spec)


@child_only
@pytest.mark.parametrize("mesh_shape, lora", [((1, 8), True), ((2, 4), False), ((8, 1), True)])
def test_model_parallel_matches_one_device(single_device, mesh_shape, lora):
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

    assert len(keras.distribution.list_devices()) == 8
    initial, reference, reference_tokens = single_device(lora)
    mesh = keras.distribution.DeviceMesh(mesh_shape, ("batch", "model"), keras.distribution.list_devices())
    layouts = T5Gemma2Backbone.get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    with distribution.scope():
        seq_2_seq_lm = _seq_2_seq_lm(lora)
        seq_2_seq_lm.set_weights(initial)
        _assert_laid_out(seq_2_seq_lm.weights, layouts, exact=True)
        weights, tokens = _fit_and_generate(seq_2_seq_lm)

    difference = _assert_same_weights(weights, reference, initial)
    print(f"mesh {mesh_shape} lora={lora}: max weight difference {difference:.3g}")
    np.testing.assert_array_equal(tokens, reference_tokens)
    _assert_laid_out(seq_2_seq_lm.weights, layouts, exact=False)
    # Optimizer slots follow their variable's layout.
    momentums = [v for v in seq_2_seq_lm.optimizer.variables if len(v.shape)]
    assert len(momentums) == len(seq_2_seq_lm.trainable_variables)
    for momentum, variable in zip(momentums, seq_2_seq_lm.trainable_variables):
        assert momentum.value.sharding.is_equivalent_to(variable.value.sharding, len(variable.shape))
    large = [w for w in seq_2_seq_lm.backbone.weights if w.path.endswith(("embeddings", "gate/kernel"))]
    assert all(w.value.sharding.shard_shape(w.shape) != tuple(w.shape) for w in large)


@child_only
def test_data_parallel_fit_matches_one_device(single_device):
    initial, reference, _ = single_device(False)
    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    with distribution.scope():
        seq_2_seq_lm = _seq_2_seq_lm(lora=False)
        seq_2_seq_lm.set_weights(initial)
        weights, _ = _fit_and_generate(seq_2_seq_lm, generate=False)
    difference = _assert_same_weights(weights, reference, initial)
    print(f"data parallel: max weight difference {difference:.3g}")
    assert all(w.value.sharding.is_fully_replicated for w in seq_2_seq_lm.weights)


def test_layout_map_checks_the_mesh_axes():
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

    mesh = keras.distribution.DeviceMesh((1, 1), ("data", "model"), keras.distribution.list_devices()[:1])
    with pytest.raises(ValueError, match="batch"):
        T5Gemma2Backbone.get_layout_map(mesh)
    layouts = T5Gemma2Backbone.get_layout_map(mesh, data_parallel_dim_name="data")
    assert layouts["token_embedding/table/embeddings"].axes == ("model", "data")
