"""Training checkpoints and run folders (`keras_t5gemma.training`) in one process, one device.

The sharded, multi-process and cross-mesh cases are in `test_multihost.py`.
"""

import json
import os
import signal
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from keras_t5gemma.training import checkpoints as checkpoints_lib
from keras_t5gemma.training.checkpoints import TrainingCheckpoints
from keras_t5gemma.training.checkpoints import check_output_folder
from keras_t5gemma.training.checkpoints import interrupts_deferred
from keras_t5gemma.training.checkpoints import latest_run
from keras_t5gemma.training.checkpoints import start_run
from keras_t5gemma.training.distribution import make_distribution
from keras_t5gemma.training.distribution import parse_mesh
from keras_t5gemma.training.distribution import process_rows

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax", reason="Orbax checkpoints: JAX")

MODEL_KWARGS = dict(
    vocabulary_size=64,
    hidden_dim=16,
    intermediate_dim=32,
    num_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_encoder_layers=1,
    num_decoder_layers=1,
    sliding_window=4,
)
BATCH = 4


def build(lora=None):
    """A fresh tiny model with AdamW (fresh layer names: checkpoints match variables by path)."""
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    backbone = T5Gemma2Backbone(**MODEL_KWARGS)
    if lora:
        backbone.enable_lora(lora)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    seq_2_seq_lm.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.01))
    seq_2_seq_lm.optimizer.build(seq_2_seq_lm.trainable_variables)
    return seq_2_seq_lm


def batch(seed):
    rng = np.random.default_rng(seed)
    x = {
        "encoder_token_ids": rng.integers(3, 60, (BATCH, 6)).astype("int32"),
        "encoder_padding_mask": np.ones((BATCH, 6), "int32"),
        "decoder_token_ids": rng.integers(3, 60, (BATCH, 4)).astype("int32"),
        "decoder_padding_mask": np.ones((BATCH, 4), "int32"),
    }
    return x, rng.integers(3, 60, (BATCH, 4)).astype("int32")


def step(seq_2_seq_lm, seed):
    x, y = batch(seed)
    return seq_2_seq_lm.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history["loss"][0]


def state(seq_2_seq_lm):
    return {v.path: keras.ops.convert_to_numpy(v) for v in [*seq_2_seq_lm.variables, *seq_2_seq_lm.optimizer.variables]}


def test_restore_gives_back_weights_and_optimizer_state_and_the_next_step(tmp_path):
    trained = build()
    step(trained, 0)
    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints", keep=2)
    path = checkpoints.save(trained, step=1)
    assert path == str(tmp_path / "checkpoints" / "1") and checkpoints.steps() == [1]
    saved = state(trained)
    next_loss = step(trained, 1)

    resumed = build()
    assert checkpoints.restore(resumed) == 1
    restored = state(resumed)
    assert restored.keys() == saved.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    assert int(resumed.optimizer.iterations) == 1
    assert step(resumed, 1) == next_loss
    for name, value in state(trained).items():
        np.testing.assert_array_equal(state(resumed)[name], value, err_msg=name)
    checkpoints.close()


def test_keeps_the_latest_and_never_overwrites_a_step(tmp_path):
    seq_2_seq_lm = build()
    checkpoints = TrainingCheckpoints(tmp_path, keep=2)
    for number in (1, 2, 3):
        checkpoints.save(seq_2_seq_lm, number)
    assert checkpoints.steps() == [2, 3] and sorted(os.listdir(tmp_path)) == ["2", "3"]
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        checkpoints.save(seq_2_seq_lm, 3)


def test_restore_names_a_variable_the_model_lacks(tmp_path):
    checkpoints = TrainingCheckpoints(tmp_path)
    checkpoints.save(build(lora=2), 1)
    with pytest.raises(
        ValueError,
        match=r"does not fit the model .*it holds \d+ variable\(s\) the model lacks: non_trainable_variables/decoder/",
    ):
        checkpoints.restore(build())
    with pytest.raises(ValueError, match="has no complete checkpoint 7"):
        checkpoints.restore(build(), step=7)
    seq_2_seq_lm = build()
    seq_2_seq_lm.compile(optimizer="adamw")  # optimizer not built
    with pytest.raises(ValueError, match="build its optimizer"):
        checkpoints.save(seq_2_seq_lm, 2)


def test_an_interrupted_write_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    seq_2_seq_lm = build()
    checkpoints = TrainingCheckpoints(tmp_path)
    checkpoints.save(seq_2_seq_lm, 1)

    async def killed(*args, **kwargs):
        raise RuntimeError("killed before the rename")

    with monkeypatch.context() as patch:
        patch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
        with pytest.raises(RuntimeError, match="killed"):
            checkpoints.save(seq_2_seq_lm, 2)
    # The failed save removed its temporary folder at once.
    assert os.listdir(tmp_path) == ["1"] and checkpoints.steps() == [1]
    # A process killed during a save leaves one; the next `TrainingCheckpoints` removes it.
    (tmp_path / "2.orbax-checkpoint-tmp-1234" / "default").mkdir(parents=True)
    reopened = TrainingCheckpoints(tmp_path)
    assert reopened.latest_step() == 1 and os.listdir(tmp_path) == ["1"]
    assert reopened.restore(build()) == 1


def test_sigint_during_a_save_is_raised_once_the_checkpoint_is_complete(tmp_path, monkeypatch):
    seq_2_seq_lm = build()
    checkpoints = TrainingCheckpoints(tmp_path)
    state_tree = checkpoints_lib._state_tree

    def interrupted_while_saving(model):
        os.kill(os.getpid(), signal.SIGINT)
        return state_tree(model)

    monkeypatch.setattr(checkpoints_lib, "_state_tree", interrupted_while_saving)
    # The handler to come back: Python's own, or SIG_IGN in a process started in the background.
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(seq_2_seq_lm, 1)
    monkeypatch.undo()
    assert checkpoints.steps() == [1]
    assert checkpoints.restore(build()) == 1
    assert signal.getsignal(signal.SIGINT) is handler


def test_interrupts_deferred_runs_the_block_to_its_end():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)
    assert finished == [True]
    with interrupts_deferred():
        pass  # no interrupt: nothing raised


def test_output_folders_refuse_what_the_package_did_not_write(tmp_path):
    check_output_folder(tmp_path / "new")
    check_output_folder(tmp_path)  # empty
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty; pass --resume .* --overwrite"):
        check_output_folder(tmp_path)
    with pytest.raises(ValueError, match="holds no fine-tuning run"):
        check_output_folder(tmp_path, resume=True)
    check_output_folder(tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="is a file"):
        check_output_folder(tmp_path / "config.json")


def test_each_run_gets_its_own_folder(tmp_path):
    assert latest_run(tmp_path) is None
    first = start_run(tmp_path, {"seed": 0})
    second = start_run(tmp_path, {"seed": 1})
    assert first.endswith(os.path.join("runs", "run_001")) and second.endswith(os.path.join("runs", "run_002"))
    assert latest_run(tmp_path) == second
    assert json.loads((tmp_path / "runs" / "run_001" / "run.json").read_text()) == {"seed": 0}
    (tmp_path / "runs" / "run_009").mkdir()  # no run.json: not a run of this package
    assert latest_run(tmp_path) == second
    check_output_folder(tmp_path, resume=True)


def test_mesh_and_rows():
    assert parse_mesh("2x4") == (2, 4) and parse_mesh(" 1X8 ") == (1, 8)
    for text in ("8", "2x", "0x8", "2*4", "axb"):
        with pytest.raises(ValueError, match="BATCHxMODEL"):
            parse_mesh(text)
    with pytest.raises(ValueError, match="needs 8 devices; there are 1"):
        make_distribution((2, 4))
    assert make_distribution() is None  # one device
    # One process feeds every complete batch and drops the incomplete last one.
    assert process_rows(10, 4) == list(range(8))


def two_hosts(batch_axis, shard):
    """What `process_rows` reads of a distribution over 2 processes."""
    mesh = SimpleNamespace(axis_names=("batch", "model"), shape=(batch_axis, 8 // batch_axis))
    return SimpleNamespace(num_processes=2, device_mesh=mesh, batch_dim_name="batch", data_shard_id=shard)


def test_each_host_feeds_the_rows_its_devices_hold():
    # Batch axis 2 over 2 hosts: the second feeds the second half of every batch.
    assert process_rows(10, 4, two_hosts(2, 1)) == [2, 3, 6, 7]
    assert process_rows(10, 4, two_hosts(4, 0)) == [0, 1, 4, 5]
    # Batch axis 1: both hosts hold every row, so both feed the whole batch.
    assert process_rows(10, 4, two_hosts(1, 0)) == list(range(8))
    with pytest.raises(ValueError, match="batch size 5 must be a multiple of the 2"):
        process_rows(10, 5, two_hosts(2, 0))
