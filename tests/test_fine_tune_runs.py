"""`keras-t5gemma fine-tune`: run folders, --resume, --overwrite, Ctrl-C, --mesh (in-process through `main`),
and `fine_tune(...)` called from Python.

The bundled tiny preset, 16 examples, batches of 8, 2 epochs: six training runs in all.
"""

import contextlib
import io
import json
import os
import re
import signal

import h5py
import numpy as np
import pytest

from keras_t5gemma import demo
from keras_t5gemma.cli import main
from keras_t5gemma.training import checkpoints as checkpoints_lib
from keras_t5gemma.training.fine_tune import fine_tune as fine_tune_in_python

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax", reason="Orbax checkpoints: JAX")

SETTINGS = ["--batch-size", "8", "--learning-rate", "1e-3", "--encoder-length", "24", "--decoder-length", "12"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rotate.jsonl"
    records = [{"input": e.prompt, "target": e.target} for e in demo.make_examples(["rotate"], 16, 3)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def fine_tune(capsys, data, output, *extra):
    """`(exit status, stdout, stderr)` of `keras-t5gemma fine-tune DATA --output OUTPUT ...`."""
    status = main(["fine-tune", str(data), "--output", str(output), *SETTINGS, "--quiet", *map(str, extra)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def losses(out):
    return [float(loss) for loss in re.search(r"Loss per epoch: (.*)\.", out).group(1).split(", ")]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """`(output folder, losses)` of an uninterrupted 2-epoch run."""
    output = tmp_path_factory.mktemp("uninterrupted")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["fine-tune", str(data), "--output", str(output), *SETTINGS, "--quiet", "--epochs", "2"])
    assert status == 0
    return output, losses(printed.getvalue())


def weights(folder):
    """`{name: array}` of a saved preset's `model.weights.h5`."""
    arrays = {}
    with h5py.File(folder / "model.weights.h5", "r") as file:
        file.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_continues_to_the_same_loss(
    capsys, data, tmp_path, monkeypatch, uninterrupted
):
    state_tree = checkpoints_lib._state_tree

    def interrupted_while_saving(model):
        monkeypatch.setattr(checkpoints_lib, "_state_tree", state_tree)
        os.kill(os.getpid(), signal.SIGINT)  # during the first checkpoint's write
        return state_tree(model)

    monkeypatch.setattr(checkpoints_lib, "_state_tree", interrupted_while_saving)
    output = tmp_path / "interrupted"
    status, out, err = fine_tune(capsys, data, output, "--epochs", "2")
    checkpoint = output / "runs" / "run_001" / "checkpoints" / "1"
    assert status == 130
    assert f"interrupted; the last complete checkpoint is {checkpoint} (epoch 1 of 2); " in err
    assert "continue with the same command and --resume" in err
    assert os.listdir(checkpoint.parent) == ["1"] and not (output / "config.json").exists()

    status, out, err = fine_tune(capsys, data, output, "--epochs", "2", "--resume")
    assert status == 0, err
    assert f"resuming {output / 'runs' / 'run_001'} after epoch 1" in out
    reference_folder, reference_losses = uninterrupted
    assert losses(out) == reference_losses[1:]
    assert sorted(os.listdir(output / "runs")) == ["run_001"]
    assert sorted(os.listdir(checkpoint.parent)) == ["1", "2"]
    ours, reference = weights(output), weights(reference_folder)
    assert ours.keys() == reference.keys()
    difference = max(float(np.abs(ours[name] - reference[name]).max()) for name in ours)
    print(f"resumed vs uninterrupted final weights: max abs diff {difference:.3g}")
    assert difference <= 1e-6


def test_a_non_empty_output_is_refused_without_resume_or_overwrite(capsys, data, tmp_path, uninterrupted):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    status, _, err = fine_tune(capsys, data, user, "--epochs", "1")
    assert status == 2 and "is not empty; pass --resume" in err
    assert (user / "config.json").read_text() == '{"mine": true}' and os.listdir(user) == ["config.json"]
    status, _, err = fine_tune(capsys, data, user, "--epochs", "1", "--resume")
    assert status == 2 and "holds no fine-tuning run" in err
    status, _, err = fine_tune(capsys, data, user, "--epochs", "1", "--resume", "--overwrite")
    assert status == 2 and "give one" in err

    # --overwrite: a second run beside the first, whose checkpoints stay.
    uninterrupted, _ = uninterrupted
    first = sorted(os.listdir(uninterrupted / "runs" / "run_001" / "checkpoints"))
    (uninterrupted / "notes.txt").write_text("kept")
    status, out, err = fine_tune(capsys, data, uninterrupted, "--epochs", "3", "--overwrite")
    assert status == 0, err
    assert sorted(os.listdir(uninterrupted / "runs")) == ["run_001", "run_002"]
    # By default only the last two epochs' checkpoints are kept (the README's claim).
    assert sorted(os.listdir(uninterrupted / "runs" / "run_002" / "checkpoints")) == ["2", "3"]
    assert sorted(os.listdir(uninterrupted / "runs" / "run_001" / "checkpoints")) == first
    assert (uninterrupted / "notes.txt").read_text() == "kept"


def test_resume_refuses_other_settings(capsys, data, uninterrupted):
    status, _, err = fine_tune(capsys, data, uninterrupted[0], "--epochs", "3", "--resume", "--seed", "5")
    assert status == 2 and "seed 0 -> 5" in err and "--resume" in err


def test_mesh_needs_as_many_devices(capsys, data, tmp_path):
    status, _, err = fine_tune(capsys, data, tmp_path / "out", "--mesh", "2x4")
    assert status == 2 and "--mesh 2x4 needs 8 devices; there are 1" in err
    status, _, err = fine_tune(capsys, data, tmp_path / "out", "--mesh", "8")
    assert status == 2 and "BATCHxMODEL" in err
    assert not (tmp_path / "out").exists()


def test_fine_tune_from_python_stops_then_resumes_from_its_checkpoint(data, tmp_path, uninterrupted):
    pairs = [(record["input"], record["target"]) for record in map(json.loads, data.read_text().splitlines())]
    settings = {"batch_size": 8, "learning_rate": 1e-3, "encoder_length": 24, "decoder_length": 12}
    output = tmp_path / "from_python"
    first = fine_tune_in_python(pairs, output, epochs=1, verbose=0, log=None, **settings)
    assert first.initial_epoch == 0 and first.saved and (output / "config.json").exists()
    assert first.run == str(output / "runs" / "run_001") and len(first.history.history["loss"]) == 1

    resumed = fine_tune_in_python(pairs, output, epochs=2, resume=True, verbose=0, log=None, **settings)
    assert resumed.run == first.run and resumed.initial_epoch == 1
    assert sorted(os.listdir(output / "runs")) == ["run_001"]
    assert sorted(os.listdir(output / "runs" / "run_001" / "checkpoints")) == ["1", "2"]
    # It went on from epoch 1's checkpoint: its one epoch is an uninterrupted run's second (the same data in the
    # same order), not a fresh run's first.
    _, reference = uninterrupted
    assert abs(reference[1] - reference[0]) > 1e-3
    np.testing.assert_allclose(resumed.history.history["loss"], reference[1:], atol=1e-4)
    with pytest.raises(ValueError, match="seed 0 -> 1"):
        fine_tune_in_python(pairs, output, epochs=3, resume=True, seed=1, verbose=0, log=None, **settings)
