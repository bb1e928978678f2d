"""One process of the simulated multi-host job in `test_multihost.py` (not a test module).

    python tests/multihost_worker.py ROLE OUTPUT [COORDINATOR PROCESS_ID]

ROLE `pod`: one of 2 processes with 4 virtual CPU devices each, joined through
JAX's coordinator at COORDINATOR. Builds the tiny vision model of
`test_distribution.py` under ModelParallel over the 8 global devices (mesh
(2, 4)), feeds its own half of each batch, takes one SGD step with momentum, generates,
saves a sharded checkpoint (every process writes its shards) and restores it
onto the same mesh. Writes what it saw to OUTPUT/pod_PROCESS_ID.npz.

ROLE `single`: one process with 8 devices: the same step on the same mesh
shape, then restores the pod's checkpoint onto a (2, 2) mesh of 4 devices.
It starts with the pod and waits for the pod's checkpoint only before the
restore (OUTPUT/pod_N.closed, written once process N closed its checkpoint).
Writes OUTPUT/single.npz.
"""

import os
import sys
import time

ROLE, OUTPUT = sys.argv[1], sys.argv[2]
POD_PROCESSES = 2
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = " ".join(
    [
        f"--xla_force_host_platform_device_count={8 // POD_PROCESSES if ROLE == 'pod' else 8}",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if ROLE == "pod":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_t5gemma.training.checkpoints import TrainingCheckpoints  # noqa: E402
from keras_t5gemma.training.distribution import make_distribution  # noqa: E402
from keras_t5gemma.training.distribution import process_rows  # noqa: E402
from keras_t5gemma.training.memory import bytes_per_device  # noqa: E402

BATCH = 8
IMAGE_TOKEN = 319
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


def build():
    from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    # Fresh layer names (a checkpoint matches variables by path) and the same
    # seed on every process: the same initial weights everywhere.
    distribution = keras.distribution.distribution()
    keras.backend.clear_session()
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    vision_encoder = T5Gemma2VisionEncoder(**VISION_KWARGS, name="vision_encoder")
    backbone = T5Gemma2Backbone(**MODEL_KWARGS, vision_encoder=vision_encoder)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    # SGD's update is linear in the gradient, so the step compares the
    # gradients' sums; Adam divides by the gradient's size and turns summation
    # order differences of near-zero gradients into differences of the step.
    seq_2_seq_lm.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), sampler="greedy")
    return seq_2_seq_lm


def batches():
    """The global batch (every process makes all of it and keeps its rows)."""
    rng = np.random.default_rng(0)
    encoder_ids = rng.integers(3, 300, (BATCH, 12)).astype("int32")
    encoder_ids[:, 2:6] = IMAGE_TOKEN
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


def gather(variables):
    """`{path: numpy value}`, each array gathered to every process."""
    from jax.experimental import multihost_utils

    return {v.path: np.asarray(multihost_utils.process_allgather(v.value, tiled=True)) for v in variables}


def device_zero_bytes(variables):
    """Bytes of the shards that the first device of this process holds."""
    device = jax.local_devices()[0]
    return sum(shard.data.nbytes for v in variables for shard in v.value.addressable_shards if shard.device == device)


def main():
    if ROLE == "pod":
        coordinator, process_id = sys.argv[3], int(sys.argv[4])
        keras.distribution.initialize(coordinator, POD_PROCESSES, process_id)
        assert jax.process_count() == POD_PROCESSES and len(jax.local_devices()) == 8 // POD_PROCESSES
        name = f"pod_{process_id}"
    else:
        name = "single"
    assert len(keras.distribution.list_devices()) == 8
    distribution = make_distribution((2, 4))
    train, labels, prompts = batches()
    # This process' rows of the global batch: the batch-axis shards its devices hold.
    rows = process_rows(BATCH, BATCH, distribution)
    local = {key: value[rows] for key, value in train.items()}
    results = {}
    with distribution.scope():
        seq_2_seq_lm = build()
        initial = gather(seq_2_seq_lm.weights)
        seq_2_seq_lm.fit(local, labels[rows], batch_size=len(rows), epochs=1, shuffle=False, verbose=0)
        after = gather(seq_2_seq_lm.weights)
        slots = gather(seq_2_seq_lm.optimizer.variables)
        # Generation: every process passes the whole prompt batch (replicated input).
        tokens = seq_2_seq_lm.generate(prompts, stop_token_ids=None)["decoder_token_ids"]
        results["tokens"] = np.asarray(tokens)
        layouts = distribution._layout_map
        results["weight_bytes"] = device_zero_bytes(seq_2_seq_lm.weights)
        results["weight_bytes_estimate"] = bytes_per_device(seq_2_seq_lm.weights, layouts)
        results["slot_bytes"] = device_zero_bytes([v for v in seq_2_seq_lm.optimizer.variables if len(v.shape)])
        # One momentum slot per trainable weight, laid out like it.
        results["slot_bytes_estimate"] = bytes_per_device(seq_2_seq_lm.trainable_weights, layouts)

    if ROLE == "single":
        wait_for_the_pod_checkpoint()
    checkpoints = TrainingCheckpoints(os.path.join(OUTPUT, "checkpoints"))
    if ROLE == "pod":
        checkpoints.save(seq_2_seq_lm, step=1)
        with distribution.scope():
            restored = build()
            restored.optimizer.build(restored.trainable_variables)
            checkpoints.restore(restored)
            results["restored_same_mesh"] = max_difference(gather(restored.weights), after)
            results["restored_same_mesh_slots"] = max_difference(gather(restored.optimizer.variables), slots)
    else:
        # The pod's checkpoint, read by one process onto 4 of its devices.
        smaller = make_distribution((2, 2), keras.distribution.list_devices()[:4])
        with smaller.scope():
            restored = build()
            restored.optimizer.build(restored.trainable_variables)
            checkpoints.restore(restored)
            assert all(len(v.value.sharding.device_set) in (1, 2, 4) for v in restored.weights)
            assert max(len(v.value.sharding.device_set) for v in restored.weights) == 4
            restored_weights = {v.path: keras.ops.convert_to_numpy(v) for v in restored.weights}
            restored_slots = {v.path: keras.ops.convert_to_numpy(v) for v in restored.optimizer.variables}
        np.savez(
            os.path.join(OUTPUT, "restored_4.npz"),
            **{"w:" + k: v for k, v in restored_weights.items()},
            **{"s:" + k: v for k, v in restored_slots.items()},
        )
    checkpoints.close()
    if ROLE == "pod":
        open(os.path.join(OUTPUT, f"{name}.closed"), "w").close()
    np.savez(
        os.path.join(OUTPUT, f"{name}.npz"),
        **{f"initial:{k}": v for k, v in initial.items()},
        **{f"after:{k}": v for k, v in after.items()},
        **{f"slot:{k}": v for k, v in slots.items()},
        **results,
    )
    print(f"{name}: done", flush=True)


def wait_for_the_pod_checkpoint(timeout=420):
    """Returns once every pod process has closed its checkpoint; raises after `timeout` seconds."""
    markers = [os.path.join(OUTPUT, f"pod_{process}.closed") for process in range(POD_PROCESSES)]
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(marker) for marker in markers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no pod checkpoint after {timeout} s: {[m for m in markers if not os.path.exists(m)]}")
        time.sleep(0.2)


def max_difference(ours, reference):
    return max(float(np.abs(value - reference[path]).max()) for path, value in ours.items())


if __name__ == "__main__":
    main()
