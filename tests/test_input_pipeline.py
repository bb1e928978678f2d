"""The streamed input of `fine_tune` (`keras_t5gemma.training.input_pipeline`) and the streamed readers of `data`."""

import collections
import inspect
import itertools
import json
import os
import tracemalloc

import keras
import numpy as np
import pytest

from keras_t5gemma import data
from keras_t5gemma.training import input_pipeline
from keras_t5gemma.training.input_pipeline import ExampleStream
from keras_t5gemma.training.input_pipeline import StreamPosition


def write_jsonl(path, start, count, width=0):
    with open(path, "w", encoding="utf-8") as file:
        for i in range(start, start + count):
            file.write(json.dumps({"input": f"q{i} " + "x" * width, "target": f"a{i}"}) + "\n")
    return path


def inputs(batches):
    return [text.split()[0] for batch in batches for text in batch["encoder_text"]]


def test_streamed_reading_is_lazy_and_bounded(tmp_path):
    # 4,000 records of ~2 KB (8 MB) and a byte that is not UTF-8 at the very end.
    path = write_jsonl(tmp_path / "big.jsonl", 0, 4000, width=2000)
    with open(path, "ab") as file:
        file.write(b'{"input": "\xff", "target": "t"}\n')
    with pytest.raises(ValueError, match=r"big.jsonl, line 4001, byte 12: not utf-8"):
        data.read_pairs(path)
    # Reading only the start never reaches the bad byte: the file is read lazily.
    first = [where for where, _ in itertools.islice(data.stream_records(path), 3)]
    assert first == [f"{path}, line {n}" for n in (1, 2, 3)]
    path.write_bytes(path.read_bytes().replace(b"\xff", b"ok"))
    tracemalloc.start()
    try:
        stream = ExampleStream(path, batch_size=8, shuffle_buffer=32, seed=1)
        seen = inputs(itertools.islice(stream.batches(), 100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(seen) == 800 == len(set(seen))
    # The file is 8 MB; counting it and streaming 800 records held about a window of 32 records and a block.
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_an_epoch_visits_every_record_once_in_a_seeded_order(tmp_path):
    files = [write_jsonl(tmp_path / f"part{n}.jsonl", 10 * n, 10) for n in range(3)]
    stream = ExampleStream(str(tmp_path / "part*.jsonl"), batch_size=4, shuffle_buffer=7, seed=3)
    assert stream.files == [str(path) for path in files] and stream.steps_per_epoch == 8  # 30 / 4, rounded up
    epochs = [inputs(itertools.islice(stream.batches(StreamPosition(epoch, 0)), 8)) for epoch in range(2)]
    for seen in epochs:
        assert sorted(seen) == sorted(f"q{i}" for i in range(30))
    assert epochs[0] != epochs[1] and epochs[0] != [f"q{i}" for i in range(30)]
    again = ExampleStream(str(tmp_path / "part*.jsonl"), batch_size=4, shuffle_buffer=7, seed=3)
    assert inputs(itertools.islice(again.batches(), 16)) == epochs[0] + epochs[1]


def test_a_position_resumes_with_the_next_unseen_example(tmp_path):
    for n in range(2):
        write_jsonl(tmp_path / f"part{n}.jsonl", 20 * n, 20)
    stream = ExampleStream(str(tmp_path / "*.jsonl"), batch_size=3, shuffle_buffer=5, seed=0)
    steps = stream.steps_per_epoch
    assert steps == 14  # 40 / 3: the last batch of each epoch holds one example
    whole = list(itertools.islice(stream.batches(), 2 * steps))
    for done in range(2 * steps):
        position = stream.position_of(json.loads(json.dumps(stream.state(stream.position_after(done)))))
        assert inputs(itertools.islice(stream.batches(position), 2 * steps - done)) == inputs(whole[done:]), done
    # A position written for other data is refused, naming what changed.
    state = stream.state(StreamPosition(0, 3))
    write_jsonl(tmp_path / "part1.jsonl", 20, 21)
    changed = ExampleStream(str(tmp_path / "*.jsonl"), batch_size=3, shuffle_buffer=5, seed=0)
    with pytest.raises(ValueError, match="other data or settings.*fingerprint"):
        changed.position_of(state)


def test_two_processes_read_disjoint_shards_that_cover_the_set(tmp_path):
    for n in range(3):
        write_jsonl(tmp_path / f"part{n}.jsonl", 8 * n, 8)
    shards = [
        ExampleStream(str(tmp_path / "*.jsonl"), batch_size=4, shuffle_buffer=4, seed=5, shard_index=i, shard_count=2)
        for i in range(2)
    ]
    assert [shard.process_batch_size for shard in shards] == [2, 2] and shards[0].steps_per_epoch == 6
    for epoch in range(2):
        parts = [
            inputs(itertools.islice(shard.batches(StreamPosition(epoch, 0)), shard.steps_per_epoch)) for shard in shards
        ]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(f"q{i}" for i in range(24))
    # Every process reads only its records: the other shard's are never parsed (a bad one goes unnoticed).
    lines = (tmp_path / "part0.jsonl").read_text().splitlines()
    lines[1] = "not json"  # record 1: shard 1's
    (tmp_path / "part0.jsonl").write_text("\n".join(lines) + "\n")
    first = ExampleStream(str(tmp_path / "*.jsonl"), batch_size=4, shuffle_buffer=4, seed=5, shard_count=2)
    assert len(inputs(itertools.islice(first.batches(), first.steps_per_epoch))) == 12
    second = ExampleStream(
        str(tmp_path / "*.jsonl"), batch_size=4, shuffle_buffer=4, seed=5, shard_index=1, shard_count=2
    )
    with pytest.raises(ValueError, match=r"part0.jsonl, line 2: not valid JSON"):
        list(itertools.islice(second.batches(), second.steps_per_epoch))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"input": "a", "target": "b"}\n\n{"input": "c"}\n', r"bad.jsonl, line 3: `target` must be"),
        ("bad.jsonl", '{"input": "a", "target": "b"}\n[1, 2\n', r"bad.jsonl, line 2: not valid JSON"),
        ("bad.csv", 'input,target\n"a\nb",c\nd\n', r"bad.csv, line 4: `target` must be a string; got None"),
        ("bad.csv", "input,answer\na,b\n", r"bad.csv: the CSV header must name the columns `input` and `target`"),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        list(ExampleStream(path, batch_size=1, shuffle_buffer=1).examples(0))


def test_parquet_files_stream_by_row_group(tmp_path):
    pyarrow = pytest.importorskip("pyarrow", reason="the test extra installs pyarrow (the parquet extra)")
    import pyarrow.parquet as parquet

    table = pyarrow.table({"input": [f"q{i}" for i in range(10)], "target": [f"a{i}" for i in range(10)]})
    parquet.write_table(table, tmp_path / "part0.parquet", row_group_size=4)
    write_jsonl(tmp_path / "part1.jsonl", 10, 5)
    assert data.count_records(str(tmp_path / "part0.parquet")) == 10
    # From row 6: the first row group (rows 1-4) is skipped whole.
    rest = list(data.stream_records(str(tmp_path / "part0.parquet"), start=5))
    assert [where.rsplit(", ", 1)[1] for where, _ in rest] == [f"row {n}" for n in range(6, 11)]
    assert [record["input"] for _, record in rest] == [f"q{i}" for i in range(5, 10)]
    files = [str(tmp_path / "part0.parquet"), str(tmp_path / "part1.jsonl")]
    assert input_pipeline.streams_by_default(files[0]) and input_pipeline.streams_by_default(files)
    assert not input_pipeline.streams_by_default(files[1])
    stream = ExampleStream(files, batch_size=5, shuffle_buffer=3, seed=2)
    assert sorted(inputs(itertools.islice(stream.batches(), 3))) == sorted(f"q{i}" for i in range(15))
    bad = pyarrow.table({"input": ["q", None], "target": ["a", "b"]})
    parquet.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet, row 2: `input` must be a string"):
        list(ExampleStream(str(tmp_path / "bad.parquet"), batch_size=1).examples(0))


class LoggedStream(ExampleStream):
    """An `ExampleStream` that notes, for each iteration of its batches, the inputs of every batch handed over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.iterations = []

    def batches(self, position=StreamPosition()):
        handed = []
        self.iterations.append(handed)
        for batch in super().batches(position):
            handed.append([text.split()[0] for text in batch["encoder_text"]])
            yield batch


def test_fine_tune_resumed_after_an_interrupt_sees_every_example_once_per_epoch(tmp_path, monkeypatch):
    from keras_t5gemma.training.fine_tune import FineTuneInterrupted
    from keras_t5gemma.training.fine_tune import fine_tune

    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as file:
        for i in range(16):
            file.write(json.dumps({"input": f"q{i} rotate: {i % 10} {(i + 3) % 10}", "target": f"{(i + 3) % 10}"}))
            file.write("\n")
    options = dict(
        output=tmp_path / "out",
        epochs=2,
        batch_size=4,
        encoder_length=12,
        decoder_length=4,
        checkpoint_every=3,
        verbose=0,
        log=None,
    )
    steps = 4  # 16 examples, batches of 4
    save = input_pipeline._StreamCheckpoint.on_train_batch_end

    def interrupt_at_step_7(callback, batch, logs=None):
        save(callback, batch, logs)
        if callback.epoch * steps + callback.offset + batch + 1 == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(input_pipeline._StreamCheckpoint, "on_train_batch_end", interrupt_at_step_7)
    first = LoggedStream(path, batch_size=4, shuffle_buffer=10, seed=0)
    with pytest.raises(FineTuneInterrupted) as stop:
        fine_tune(first, **options)
    # Checkpoints after steps 3, 4 (the first epoch's end) and 6 (2 kept); step 7 was lost with the process.
    assert stop.value.checkpoint.endswith(os.path.join("checkpoints", "6"))
    monkeypatch.undo()
    second = LoggedStream(path, batch_size=4, shuffle_buffer=10, seed=0)
    result = fine_tune(second, resume=True, **options)
    assert result.initial_epoch == 1 and len(result.history.history["loss"]) == 1
    # What the model trained on: the first 6 batches of the first run, then 2 of the resumed one (the rest of
    # epoch 2). Keras reads a first iteration of the data to see its structure (the last iteration is the one
    # trained on), and the pipeline reads ahead, so each handed over more batches than were trained.
    trained = first.iterations[-1][:6] + second.iterations[-1][:2]
    epochs = [[name for batch in trained[e * steps : (e + 1) * steps] for name in batch] for e in range(2)]
    for seen in epochs:
        counts = collections.Counter(seen)
        assert sorted(counts) == sorted(f"q{i}" for i in range(16)) and set(counts.values()) == {1}, counts
    assert epochs[0] != epochs[1]
    assert sorted(os.listdir(os.path.join(result.run, "checkpoints"))) == ["6", "6.input.json", "8", "8.input.json"]


def test_fine_tune_refuses_streaming_options_it_cannot_honour(tmp_path):
    from keras_t5gemma.training.fine_tune import fine_tune

    path = write_jsonl(tmp_path / "pairs.jsonl", 0, 4)
    with pytest.raises(ValueError, match="--checkpoint-every saves a streamed run's position.*add --stream"):
        fine_tune(path, tmp_path / "a", checkpoint_every=2, log=None)
    with pytest.raises(ValueError, match="--task classify reads its labelled data in memory: drop --objective"):
        fine_tune(path, tmp_path / "b", task="classify", stream=True, log=None)
    with pytest.raises(ValueError, match="reads its corpus as a stream: drop stream=False"):
        fine_tune(path, tmp_path / "c", objective="ul2", stream=False, log=None)
    with pytest.raises(ValueError, match=r"pairs.jsonl has 4 examples, fewer than one batch of 8"):
        ExampleStream(path, batch_size=8, drop_remainder=True)


def test_the_command_line_passes_the_streaming_options_on(monkeypatch, tmp_path):
    from keras_t5gemma.cli import build_parser
    from keras_t5gemma.commands import fine_tune as command
    from keras_t5gemma.training import fine_tune as training

    received = {}

    def fake_fine_tune(data, output, **options):
        received.update(options, data=data)
        raise ValueError("stop here")

    fake_fine_tune.__signature__ = inspect.signature(training.fine_tune)  # the options the command passes on
    monkeypatch.setattr(training, "fine_tune", fake_fine_tune)
    arguments = ["fine-tune", "shards/*.parquet", "--stream", "--shuffle-buffer", "64", "--checkpoint-every", "5"]
    with pytest.raises(ValueError, match="stop here"):
        command.run_fine_tune(build_parser().parse_args([*arguments, "--objective", "ul2"]))
    assert received["data"] == "shards/*.parquet" and received["stream"] is True
    assert (received["shuffle_buffer"], received["checkpoint_every"], received["objective"]) == (64, 5, "ul2")
    with pytest.raises(ValueError, match="stop here"):
        command.run_fine_tune(build_parser().parse_args(["fine-tune", "data.jsonl"]))
    assert received["stream"] is None and received["objective"] is None and received["checkpoint_every"] is None


KILLED_WORKER = """
import json, sys
from keras_t5gemma.training.fine_tune import fine_tune
from keras_t5gemma.training.input_pipeline import ExampleStream, StreamPosition

data, output, log, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "resume"


class Logged(ExampleStream):
    iterations = 0

    def batches(self, position=StreamPosition()):
        Logged.iterations += 1
        iteration = Logged.iterations
        for batch in super().batches(position):
            names = [text.split()[0] for text in batch["encoder_text"]]
            with open(log, "a") as file:
                file.write(json.dumps([iteration, position.epoch, position.example, names]) + "\\n")
            yield batch


stream = Logged(data, batch_size=4, shuffle_buffer=10, seed=0)
fine_tune(stream, output, epochs=2, batch_size=4, encoder_length=12, decoder_length=4, checkpoint_every=1,
          verbose=0, log=None, resume=resume)
"""


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_seeing_every_example_once_per_epoch(tmp_path):
    """A real `kill -9` while training (a checkpoint every step), then `resume`: the batches trained into the final
    model add up to every example once per epoch."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"input": f"q{i} rotate: {i % 10}", "target": f"{i % 10}"}) + "\n" for i in range(32))
    )
    worker = tmp_path / "worker.py"
    worker.write_text(KILLED_WORKER)
    checkpoints = tmp_path / "out" / "runs" / "run_001" / "checkpoints"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    process = subprocess.Popen([sys.executable, worker, path, tmp_path / "out", logs[0], "new"])
    deadline = time.time() + 600
    while not (checkpoints / "11").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    subprocess.run([sys.executable, worker, path, tmp_path / "out", logs[1], "resume"], check=True, timeout=600)

    def training_iteration(log):
        """The batches of the log's last iteration (Keras first reads one to see the data's structure)."""
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        last = max(row[0] for row in rows)
        return [row for row in rows if row[0] == last]

    steps = 8  # 32 examples, batches of 4
    first, second = training_iteration(logs[0]), training_iteration(logs[1])
    assert first[0][1:3] == [0, 0]
    epoch, example = second[0][1:3]  # where the resumed run started: the newest checkpoint the kill left
    restored = epoch * steps + example // 4
    assert restored >= 11
    trained = [row[3] for row in first[:restored]] + [row[3] for row in second[: 2 * steps - restored]]
    for e in range(2):
        seen = [name for batch in trained[e * steps : (e + 1) * steps] for name in batch]
        assert sorted(seen) == sorted(f"q{i}" for i in range(32)) and len(set(seen)) == 32


def test_batches_preprocessed_in_the_stream_feed_fit_as_model_inputs(tmp_path):
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor

    preprocessor = T5Gemma2Seq2SeqLMPreprocessor.from_preset(
        "t5gemma2_tiny_digits", encoder_sequence_length=10, decoder_sequence_length=6
    )
    path = write_jsonl(tmp_path / "pairs.jsonl", 0, 6)
    rows = []

    def then(x, y, sample_weight):  # stands for a packing step: sees the preprocessed arrays, may change them
        rows.append(len(y))
        return {**x, "row": np.arange(len(y), dtype="int32")}, y, sample_weight

    stream = ExampleStream(path, batch_size=4, shuffle_buffer=1, **input_pipeline.preprocessed(preprocessor, then=then))
    texts = input_pipeline.pair_texts([(f"q{i} ", f"a{i}", None) for i in range(4)])
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(preprocessor(texts))
    first = next(iter(input_pipeline.dataset(stream)))
    assert np.array_equal(first[0]["encoder_token_ids"], x["encoder_token_ids"])
    assert np.array_equal(first[1], y) and np.array_equal(first[2], sample_weight)
    assert first[0]["row"].numpy().tolist() == [0, 1, 2, 3] and rows[0] == 1  # the signature's made-up example
    assert [len(batch[1]) for batch in itertools.islice(stream.batches(), 2)] == [4, 2]


TWO_PROCESS_WORKER = """
import json, os, sys
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from keras_t5gemma.training import input_pipeline
from keras_t5gemma.training.fine_tune import fine_tune

iterations = []
batches = input_pipeline.ExampleStream.batches


def logged(self, position=input_pipeline.StreamPosition()):
    handed = []
    iterations.append(handed)
    for batch in batches(self, position):
        handed.append([text.split()[0] for text in batch["encoder_text"]])
        yield batch


input_pipeline.ExampleStream.batches = logged
data, output, log = sys.argv[1:4]
result = fine_tune(data, output, stream=True, multi_host=True, epochs=1, batch_size=4, encoder_length=12,
                   decoder_length=4, checkpoint_every=2, verbose=0, log=None)
with open(log, "w") as file:
    json.dump({"trained": iterations[-1][:4], "loss": result.history.history["loss"]}, file)
"""


@pytest.mark.slow
def test_two_processes_fine_tune_on_disjoint_shards(tmp_path):
    """A streamed `fine_tune` in a two-process JAX job (one CPU device each): every process trains on its own
    records, together every example of the complete global batches once, and both save the stream's position."""
    import socket
    import subprocess
    import sys

    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"input": f"q{i} rotate: {i % 10}", "target": f"{i % 10}"}) + "\n" for i in range(18))
    )
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    processes = [
        subprocess.Popen(
            [sys.executable, worker, path, tmp_path / "out", tmp_path / f"{process}.json"],
            env={
                **os.environ,
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}",
                "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                "KERAS_DISTRIBUTION_PROCESS_ID": str(process),
            },
        )
        for process in range(2)
    ]
    assert [process.wait(timeout=900) for process in processes] == [0, 0]
    logs = [json.loads((tmp_path / f"{process}.json").read_text()) for process in range(2)]
    # 18 examples, a global batch of 4 (2 a process): 4 steps, the last 2 examples left out.
    parts = [[name for batch in log["trained"] for name in batch] for log in logs]
    assert [len(part) for part in parts] == [8, 8] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(f"q{i}" for i in range(16))
    assert logs[0]["loss"] == logs[1]["loss"]
    checkpoints = tmp_path / "out" / "runs" / "run_001" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "2.input.json", "4", "4.input.json"]
    assert json.loads((checkpoints / "4.input.json").read_text())["shards"] == 2


class LengthsPreprocessor:
    """Stands for a Seq2SeqLM preprocessor: example `q<i>` gets `1 + i % 7` encoder and `1 + i % 3` decoder tokens,
    all `i + 1`."""

    def __call__(self, texts):
        ids = [int(text.split()[0][1:]) if text[1:2].isdigit() else 0 for text in texts["encoder_text"]]
        ids = np.array(ids)[:, None]
        encoder = (np.arange(8)[None] < 1 + ids % 7).astype("int32")
        decoder = (np.arange(4)[None] < 1 + ids % 3).astype("int32")
        x = {
            "encoder_token_ids": encoder * (ids + 1),
            "encoder_padding_mask": encoder,
            "decoder_token_ids": decoder * (ids + 1),
            "decoder_padding_mask": decoder,
        }
        return x, decoder * (ids + 1), decoder.astype("float32")


def packed_names(x):
    """The examples (`q<i>`) of a packed batch, in the order of their tokens."""
    names = []
    for row, segments in zip(np.asarray(x["encoder_token_ids"]), np.asarray(x["encoder_segment_ids"])):
        for segment in range(1, segments.max() + 1):
            names.append(f"q{row[segments == segment][0] - 1}")
    return names


def test_a_packed_stream_resumes_with_the_next_unseen_example(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", 0, 40)
    stream = input_pipeline.PackedStream(
        ExampleStream(path, batch_size=3, shuffle_buffer=16, seed=4), LengthsPreprocessor(), chunk=5
    )
    assert stream.signature[0]["encoder_segment_ids"] == ((None, 8), "int32")
    epochs = []
    for epoch in range(2):
        batches = list(stream.batches(StreamPosition(epoch, 0)))
        ends = stream.iterations[-1]
        assert len(ends) == len(batches) and ends[-1] == (StreamPosition(epoch, 40), True)
        assert {len(y) for _, y, _ in batches} == {3}  # every step one shape
        names = [packed_names(x) for x, _, _ in batches]
        seen = [name for batch in names for name in batch]
        assert sorted(seen) == sorted(f"q{i}" for i in range(40))
        # Resumed from the position after any batch (as saved and read back): the rest of the epoch, packed the same.
        for done, (position, _) in enumerate(ends[:-1]):
            state = json.loads(json.dumps(stream.state(position, step=done + 1)))
            assert state["step"] == done + 1 and position.example == len(
                [name for batch in names[: done + 1] for name in batch]
            )
            rest = [packed_names(x) for x, _, _ in stream.batches(stream.position_of(state))]
            assert rest == names[done + 1 :], done
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="packed rows 3 -> 4"):
        input_pipeline.PackedStream(ExampleStream(path, batch_size=4, seed=4), LengthsPreprocessor()).position_of(state)
    with pytest.raises(ValueError, match="packing a stream takes one process"):
        input_pipeline.PackedStream(ExampleStream(path, batch_size=4, shard_count=2), LengthsPreprocessor())


class LoggedPackedStream(input_pipeline.PackedStream):
    """A `PackedStream` that notes, for each iteration of its batches, where it started and the examples of every
    batch handed over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def batches(self, position=StreamPosition()):
        handed = []
        self.log.append((position, handed))
        for batch in super().batches(position):
            handed.append(packed_names(batch[0]))
            yield batch

    def trained(self):
        """The batches of each `fit`'s iteration (Keras may first read one to see the data's structure), in order."""
        last = {}
        for position, handed in self.log:
            last[position] = handed
        return [batch for handed in last.values() for batch in handed]


def test_packed_training_resumed_after_an_interrupt_sees_every_example_once_per_epoch(tmp_path):
    """`fit_stream` on a `PackedStream` (a tiny model, real checkpoints every 2 steps): stopped after a step that
    has no checkpoint, restored and resumed, the batches trained into the model hold every example once per epoch."""
    from keras_t5gemma.training.checkpoints import TrainingCheckpoints
    from keras_t5gemma.training.packing import token_mean_loss

    def tiny_model():
        keras.utils.set_random_seed(0)
        names = [f"{side}_{kind}" for side in ("encoder", "decoder") for kind in ("token_ids", "padding_mask")]
        names += ["encoder_segment_ids", "decoder_segment_ids"]
        inputs = {name: keras.Input((None,), dtype="int32", name=name) for name in names}
        model = keras.Model(inputs, keras.layers.Embedding(32, 32, name="table")(inputs["decoder_token_ids"]))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=token_mean_loss())
        model.optimizer.build(model.trainable_variables)
        return model

    path = write_jsonl(tmp_path / "pairs.jsonl", 0, 24)

    def stream():
        return LoggedPackedStream(
            ExampleStream(path, batch_size=3, shuffle_buffer=10, seed=1), LengthsPreprocessor(), chunk=4
        )

    first_epoch = len(list(stream().batches(StreamPosition(0, 0))))
    stop_after = first_epoch + 3 + (first_epoch % 2 == 1)  # odd: the last checkpoint is the step before

    class Interrupt(keras.callbacks.Callback):
        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            Interrupt.steps += 1
            if Interrupt.steps == stop_after:
                raise KeyboardInterrupt

    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints", keep=2)
    options = dict(epochs=2, checkpoints=checkpoints, checkpoint_every=2, verbose=0)
    first = stream()
    with pytest.raises(KeyboardInterrupt):
        input_pipeline.fit_stream(tiny_model(), first, callbacks=[Interrupt()], **options)
    model = tiny_model()
    step = checkpoints.restore(model)
    assert step == stop_after - 1
    second = stream()
    position = second.position_of(checkpoints.input_position(step))
    assert position.epoch == 1 and position.example > 0
    history = input_pipeline.fit_stream(model, second, start=position, start_step=step, **options)
    assert len(history.history["loss"]) == 1
    trained = first.trained()[:step] + second.trained()
    for batches in (trained[:first_epoch], trained[first_epoch:]):
        counts = collections.Counter(name for batch in batches for name in batch)
        assert sorted(counts) == sorted(f"q{i}" for i in range(24)) and set(counts.values()) == {1}, counts
    assert checkpoints.latest_step() == len(trained)
