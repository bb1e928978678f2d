"""Faults of real machines and files people really have (issue 33): full disks, damaged checkpoints and
weights, two writers at once, byte-order marks and other encodings, 16-bit images, silent truncation,
`max_length` beyond what the model and the machine hold. CLI cases run through the CLI, in process.

A full disk is a 1 MiB tmpfs where `mount` is allowed (root; skipped elsewhere), and otherwise the free
space that `shutil.disk_usage` reports, lowered by monkeypatching.
"""

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import run
from test_cli import write_jsonl

from keras_t5gemma import demo
from keras_t5gemma.data import read_lines
from keras_t5gemma.data import read_pairs
from keras_t5gemma.models.t5gemma2 import t5gemma2_seq_2_seq_lm as seq_2_seq_lm_module
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import pil_image_to_rgb
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import TruncationWarning
from keras_t5gemma.training.fine_tune import DEFAULT_PRESET
from keras_t5gemma.utils import safe_files
from keras_t5gemma.utils.preset_utils import resolve_preset

BUNDLED = resolve_preset(DEFAULT_PRESET)
JAX = os.environ.get("KERAS_BACKEND", "jax") == "jax"


@pytest.fixture(scope="module")
def seq_2_seq_lm():
    model = T5Gemma2Seq2SeqLM.from_preset(DEFAULT_PRESET)
    model.compile(sampler="greedy")
    return model


def _files(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@contextlib.contextmanager
def small_filesystem(tmp_path, size="1m"):
    """A tmpfs of `size` mounted under `tmp_path` (skips where `mount` is not allowed); unmounted after."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _low_free_space(monkeypatch, free=300 * 1024):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(safe_files.shutil, "disk_usage", lambda path: usage(free * 4, free * 3, free))


# === Full disks ===


def test_save_to_preset_on_a_full_disk_is_an_oserror_and_leaves_everything_as_it_was(
    seq_2_seq_lm, tmp_path, monkeypatch
):
    previous = tmp_path / "previous"
    shutil.copytree(BUNDLED, previous)
    before = _files(previous)
    _low_free_space(monkeypatch)
    for target, overwrite in ((tmp_path / "new", False), (previous, True)):
        with pytest.raises(OSError, match="No space left for the preset folder .* it needs about 1.*MiB") as error:
            seq_2_seq_lm.save_to_preset(str(target), overwrite=overwrite)
        assert error.value.errno == 28
    assert sorted(path.name for path in tmp_path.iterdir()) == ["previous"]  # no `.NAME.partial-*`, no lock
    assert _files(previous) == before


def test_save_to_preset_onto_a_real_full_disk_does_not_crash_the_process(seq_2_seq_lm, tmp_path):
    with small_filesystem(tmp_path) as disk:
        with pytest.raises(OSError, match="No space left"):
            seq_2_seq_lm.save_to_preset(str(disk / "preset"))
        assert os.listdir(disk) == []


@pytest.mark.skipif(not JAX, reason="Orbax checkpoints: JAX")
def test_a_checkpoint_write_that_fails_keeps_nothing_and_prints_no_traceback(tmp_path, monkeypatch, capfd):
    from test_checkpoints import build
    from test_checkpoints import step

    from keras_t5gemma.training import checkpoints as checkpoints_lib

    model = build()
    step(model, 0)
    with small_filesystem(tmp_path, "2m") as disk:
        folder = disk / "checkpoints"
        checkpoints = checkpoints_lib.TrainingCheckpoints(folder, keep=2)
        usage = shutil.disk_usage(disk)
        checkpoints.save(model, 1)  # fits
        capfd.readouterr()
        # The space check passes (as if another process filled the disk meanwhile): Orbax's write fails.
        monkeypatch.setattr(checkpoints_lib, "check_free_space", lambda *args: None)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 64 * 1024))
        with pytest.raises(OSError, match="could not write the checkpoint .*/2 \\(No space left on device\\)"):
            checkpoints.save(model, 2)
        assert sorted(os.listdir(folder)) == ["1"] and checkpoints.steps() == [1]
        err = capfd.readouterr().err
        assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err
        filler.unlink()
        # The check alone refuses, before writing.
        monkeypatch.setattr(checkpoints_lib, "check_free_space", safe_files.check_free_space)
        _low_free_space(monkeypatch, free=usage.free // 8)
        with pytest.raises(OSError, match="No space left for the checkpoint"):
            checkpoints.save(model, 2)
        assert sorted(os.listdir(folder)) == ["1"]
        checkpoints.close()


# === Damaged files ===


@pytest.mark.skipif(not JAX, reason="Orbax checkpoints: JAX")
def _array_data_files(checkpoint):
    files = [path for path in checkpoint.rglob("ocdbt.process_*/d/*") if path.is_file()]
    assert files, sorted(checkpoint.rglob("*"))
    return files


def test_restore_sets_a_damaged_newest_checkpoint_aside_and_restores_the_one_before(tmp_path):
    from test_checkpoints import build
    from test_checkpoints import state
    from test_checkpoints import step

    from keras_t5gemma.training.checkpoints import TrainingCheckpoints

    model = build()
    checkpoints = TrainingCheckpoints(tmp_path, keep=3)
    step(model, 0)
    checkpoints.save(model, 1)
    first = state(model)
    step(model, 1)
    checkpoints.save(model, 2)
    # Orbax splits the arrays over several data files, differently each run: cut every one to half.
    for part in _array_data_files(tmp_path / "2"):
        part.write_bytes(part.read_bytes()[: os.path.getsize(part) // 2])

    restored = build()
    warned = []
    assert checkpoints.restore(restored, warn=warned.append) == 1
    assert len(warned) == 1 and f"{tmp_path}/2 cannot be read" in warned[0] and "set it aside as" in warned[0]
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged"] and checkpoints.steps() == [1]
    for name, value in first.items():
        np.testing.assert_array_equal(state(restored)[name], value)
    # The run goes on: step 2 is written again beside the damaged copy.
    step(restored, 1)
    checkpoints.save(restored, 2)
    assert checkpoints.steps() == [1, 2]

    # No checkpoint that reads: one line saying so.
    for number in (1, 2):
        for part in _array_data_files(tmp_path / str(number)):
            part.write_bytes(b"")
    with pytest.raises(ValueError, match="no checkpoint in .* can be read: .*2.damaged-2, .*1.damaged"):
        checkpoints.restore(build(), warn=warned.append)
    checkpoints.close()


def test_a_truncated_weights_file_is_named_with_status_2(capsys, tmp_path):
    preset = tmp_path / "preset"
    shutil.copytree(BUNDLED, preset)
    weights = preset / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    status, _, err = run(capsys, "generate", "--preset", preset, "reverse: 1 2")
    assert status == 2 and f"`{weights}` is damaged or incomplete" in err and "bytes of the 1," in err, err
    assert err.count("\n") == 1


# === Two writers ===


def _hold_lock_in_another_process(path):
    """A child process (stdlib only) holding `writer_lock(path)` until killed; returns it once it holds it."""
    source = safe_files.__file__
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('safe_files', {source!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"with module.writer_lock({str(path)!r}):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, "fine-tune-stand-in"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_refuses_at_once_naming_the_first_and_a_killed_one_blocks_nothing(
    capsys, seq_2_seq_lm, tmp_path
):
    output = tmp_path / "output"
    data = write_jsonl(tmp_path / "data.jsonl", [{"input": "rotate: 1 2", "target": "2 1"}] * 4)
    child = _hold_lock_in_another_process(output)
    try:
        started = time.monotonic()
        status, _, err = run(capsys, "fine-tune", data, "--output", output, "--epochs", "1", "--quiet")
        assert status == 2 and f"is being written by pid {child.pid} (-c fine-tune-stand-in)" in err, err
        assert time.monotonic() - started < 20
        with pytest.raises(safe_files.FolderInUseError, match=f"pid {child.pid}"):
            seq_2_seq_lm.save_to_preset(str(output))
        assert not output.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The kernel dropped the killed holder's lock: the next writer goes ahead.
    seq_2_seq_lm.save_to_preset(str(output))
    assert (output / "model.weights.h5").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.jsonl", "output"]


def test_writer_lock_is_reentrant_within_a_process(tmp_path):
    with safe_files.writer_lock(tmp_path / "out"):
        with safe_files.writer_lock(tmp_path / "out"):
            safe_files.check_not_in_use(tmp_path / "out")
        assert (tmp_path / ".out.lock").exists()
    assert not (tmp_path / ".out.lock").exists()


# === max_length ===


def test_max_length_beyond_the_decoders_positions_is_refused(capsys, seq_2_seq_lm):
    with pytest.raises(ValueError, match="`max_length` 1,000,000,000 is beyond the decoder's 131,072 positions"):
        seq_2_seq_lm.generate("reverse: 1 2", max_length=1_000_000_000)
    with pytest.raises(ValueError, match="beyond the decoder's"):
        next(iter(seq_2_seq_lm.stream_generate("reverse: 1 2", max_length=200_000)))
    status, _, err = run(capsys, "generate", "--max-length", "1000000000", "reverse: 1 2")
    assert status == 2 and "beyond the decoder's 131,072 positions" in err, err


def test_max_length_whose_cache_exceeds_the_memory_is_refused(seq_2_seq_lm, monkeypatch):
    monkeypatch.setattr(seq_2_seq_lm_module, "available_memory_bytes", lambda: 2**20)
    with pytest.raises(ValueError, match="needs a .* GiB decoder cache for 3 prompt\\(s\\), more than the 0.0 GiB"):
        seq_2_seq_lm.generate(["reverse: 1 2"] * 3, max_length=100_000)
    assert seq_2_seq_lm.generate("reverse: 1 2", max_length=8)  # a cache that fits


# === Images of every mode ===

BLACK, WHITE = demo.COLORS["black"][0], demo.COLORS["white"][0]


@pytest.mark.parametrize(
    "mode, value, grey",
    [
        ("I;16", 0, 0),
        ("I;16", 1000, 4),  # dark: Pillow's own conversion made it white
        ("I;16", 65535, 255),
        ("I;16B", 32896, 128),
        ("I", 30000, 117),  # 32-bit integers holding 16-bit values
        ("I", 2**30, 128),
        ("F", 0.5, 128),
        ("La", (50, 128), 177),  # premultiplied: 100 at half alpha over white
    ],
)
def test_wide_and_premultiplied_modes_keep_their_grey_level(mode, value, grey):
    np.testing.assert_array_equal(pil_image_to_rgb(Image.new(mode, (3, 2), value)), np.full((2, 3, 3), grey, "uint8"))


def test_images_without_a_colour_meaning_are_refused():
    with pytest.raises(ValueError, match="float image .* must hold values in \\[0, 1\\]"):
        pil_image_to_rgb(Image.new("F", (2, 2), 3.0))
    with pytest.raises(ValueError, match="holds negative values"):
        pil_image_to_rgb(Image.new("I", (2, 2), -5))


@pytest.mark.parametrize("level, colour", [(BLACK, "black"), (WHITE, "white")])
def test_a_16_bit_png_is_answered_with_its_true_colour(capsys, tmp_path, level, colour):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), level * 257, "uint16")).save(path)
    assert Image.open(path).mode == "I;16"
    status, out, err = run(capsys, "generate", "color:", "--image", path)
    assert status == 0 and out.strip() == colour, (out, err)


# === Text files: byte-order marks, other encodings ===


def test_utf8_byte_order_marks_are_accepted_in_jsonl_csv_and_prompt_files(tmp_path):
    bom = "\ufeff".encode()
    (tmp_path / "data.jsonl").write_bytes(bom + b'{"input": "rotate: 1 2", "target": "2 1"}\n')
    (tmp_path / "data.csv").write_bytes(bom + b"input,target\r\nrotate: 1 2,2 1\r\n")
    (tmp_path / "prompts.txt").write_bytes(bom + b"reverse: 1 2\r\nsort: 2 1\r\n")
    for name in ("data.jsonl", "data.csv"):
        assert read_pairs(str(tmp_path / name)) == [("rotate: 1 2", "2 1", None)]
    assert read_lines(str(tmp_path / "prompts.txt")) == ["reverse: 1 2", "sort: 2 1"]


def test_a_file_that_is_not_utf8_is_named_with_line_and_byte_and_read_with_encoding(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("reverse: 1 2\nsort: 2 1 é\n".encode("latin-1"))
    status, _, err = run(capsys, "generate", "--file", prompts)
    assert status == 2 and f"{prompts}, line 2, byte 11: not utf-8 text (byte 0xe9" in err, err
    assert "--encoding" in err
    status, out, err = run(capsys, "generate", "--file", prompts, "--encoding", "latin-1", "--show-prompt")
    assert status == 0 and "sort: 2 1 é ->" in out, err
    data = tmp_path / "data.jsonl"
    data.write_bytes('{"input": "café", "target": "1"}\n'.encode("cp1252"))
    assert read_pairs(str(data), encoding="cp1252") == [("café", "1", None)]
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        read_pairs(str(data), encoding="klingon")


# === Truncation is never silent ===


def _token_counts(seq_2_seq_lm, texts):
    tokenizer = seq_2_seq_lm.preprocessor.tokenizer
    return np.array([len(tokenizer.tokenize(text)) for text in texts])


def test_fit_warns_once_how_many_targets_were_cut():
    # Its own model: a command run in this process (`set_random_seed`) clears TF's tokenizer resources.
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(DEFAULT_PRESET)
    preprocessor = seq_2_seq_lm.preprocessor
    examples = demo.make_examples(["reverse"], 6, 5)
    x = {"encoder_text": [e.prompt for e in examples], "decoder_text": [e.target for e in examples]}
    lengths = _token_counts(seq_2_seq_lm, x["decoder_text"]) + 2  # <bos>, <eos>
    decoder_length = int(np.median(lengths))  # some are cut, some are not
    cut = lengths[lengths > decoder_length + 1] - (decoder_length + 1)
    assert 0 < len(cut) < len(lengths)
    preprocessor.decoder_sequence_length, preprocessor.encoder_sequence_length = decoder_length, 64
    seq_2_seq_lm.compile(optimizer="sgd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq_2_seq_lm.fit(x, batch_size=3, epochs=2, verbose=0)
    truncations = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
    assert truncations == [
        f"{len(cut)} of 6 targets were cut to decoder_sequence_length {decoder_length} "
        f"(by {cut.min()}{'' if cut.min() == cut.max() else f' to {cut.max()}'} tokens; {cut.sum()} tokens in all). "
        "Raise the length to train on whole examples."
    ]


@pytest.mark.skipif(not JAX, reason="Orbax checkpoints: JAX")
def test_fine_tune_says_what_it_cut_once_and_resumes_past_a_damaged_checkpoint(capsys, seq_2_seq_lm, tmp_path):
    records = [{"input": e.prompt, "target": e.target} for e in demo.make_examples(["rotate"], 8, 3)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    settings = ["--batch-size", "8", "--encoder-length", "8", "--decoder-length", "4", "--quiet"]
    output = tmp_path / "output"
    status, out, err = run(capsys, "fine-tune", data, "--output", output, "--epochs", "2", *settings)
    assert status == 0, err
    inputs = _token_counts(seq_2_seq_lm, [r["input"] for r in records]) + 1  # <bos>
    targets = _token_counts(seq_2_seq_lm, [r["target"] for r in records]) + 2
    cut_inputs, cut_targets = (inputs > 8).sum(), (targets > 5).sum()
    assert cut_inputs and cut_targets
    assert out.count("Truncated: ") == 1, out
    assert f"Truncated: {cut_inputs} of 8 inputs were cut to --encoder-length 8 (by " in out, out
    assert f"{cut_targets} of 8 targets were cut to --decoder-length 4 (by " in out, out

    checkpoints = output / "runs" / "run_001" / "checkpoints"
    for part in _array_data_files(checkpoints / "2"):
        part.write_bytes(part.read_bytes()[: os.path.getsize(part) // 2])
    status, out, err = run(capsys, "fine-tune", data, "--output", output, "--epochs", "3", "--resume", *settings)
    assert status == 0, err
    assert f"keras-t5gemma: warning: the checkpoint {checkpoints}/2 cannot be read" in err, err
    assert "Traceback" not in err
    assert "resuming" in out and "after epoch 1" in out, out
    assert sorted(os.listdir(checkpoints)) == ["2", "2.damaged", "3"]
    assert json.loads((output / "config.json").read_text())["registered_name"]


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    """Atomic writes go through `tempfile`, whose files are private (0600, folders 0700): not what a user expects."""
    from keras_t5gemma.utils.safe_files import atomic_file
    from keras_t5gemma.utils.safe_files import atomic_folder

    previous = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "predictions.jsonl", "w") as file:
            file.write("{}\n")
        with atomic_folder(str(tmp_path / "preset"), lambda name: True, False, "preset folder") as folder:
            (Path(folder) / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "predictions.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "preset").stat().st_mode & 0o777 == 0o755
