"""Streamed input for `fine_tune`: files read as a stream, shuffled in windows, sharded, resumable.

`ExampleStream` reads JSONL, CSV and Parquet files (and globs of them,
`keras_t5gemma.data.stream_records`) a record at a time: at most one shuffle
window of records (`shuffle_buffer`) and one batch are held in memory, never
the set. Its batches feed `fit` through `tf.data.Dataset.from_generator`
(`dataset`), and the preprocessor is mapped over them there, as for in-memory
pairs.

Order. Each epoch visits the files in an order drawn from `(seed, epoch)`,
and each process takes every `shard_count`-th record of that sequence (its
shard, `shard_index`): a process parses only its own records. A process'
shard is cut into windows of `shuffle_buffer` records, each permuted by a
generator seeded with `(seed, epoch, window)`. The order is then a function of
the seed and the position alone, which is what makes a position resumable.

Positions. `StreamPosition(epoch, example)` says how many examples of its
shard a process has consumed in an epoch. Since the files' record counts are
known (one counting pass at the start, JSON left unparsed; Parquet from its
metadata), the window an example falls in, the file and the record where that
window starts follow by arithmetic: resuming seeks there (skipping records
unparsed, Parquet row groups whole), re-reads one window, and goes on with
the next unseen example. `state` writes a position as a small JSON-able dict
(epoch, example, the window's file and record, the seed, the shuffle window,
the batch, the shards and a fingerprint of the files), and `position_of` reads
it back, refusing one written for other files or settings.

`fit_stream` trains on a stream and saves a checkpoint (with the stream's
position, `TrainingCheckpoints.save(..., input_position=...)`) every
`checkpoint_every` steps and after each epoch, so that a run killed
mid-epoch resumes with the next example its last checkpoint had not seen: no
example is repeated or skipped within an epoch.

Example:
```python
import itertools
import json
import tempfile

path = f"{tempfile.mkdtemp()}/pairs.jsonl"
with open(path, "w") as file:
    file.writelines(json.dumps({"input": f"q{i}", "target": f"a{i}"}) + "\\n" for i in range(10))
stream = ExampleStream(path, batch_size=4, shuffle_buffer=8, seed=0)
assert stream.steps_per_epoch == 3  # 4 + 4 + 2
first_epoch = [text for batch in itertools.islice(stream.batches(), 3) for text in batch["encoder_text"]]
assert sorted(first_epoch) == sorted(f"q{i}" for i in range(10))
# Resuming after one batch gives the rest of the epoch.
rest = [text for batch in itertools.islice(stream.batches(StreamPosition(0, 4)), 2) for text in batch["encoder_text"]]
assert rest == first_epoch[4:]
```
"""

import dataclasses
import glob
import hashlib
import math
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_t5gemma.data import DEFAULT_ENCODING
from keras_t5gemma.data import STREAM_SUFFIXES
from keras_t5gemma.data import count_records
from keras_t5gemma.data import pair_of_record
from keras_t5gemma.data import stream_records
from keras_t5gemma.training import checkpoints as training_checkpoints
from keras_t5gemma.training import packing

# Records held and permuted at once (per process): the bound on the stream's memory.
DEFAULT_SHUFFLE_BUFFER = 10_000
# A single JSONL/CSV file larger than this is streamed even without `stream=True`.
STREAM_AUTOMATICALLY_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where a process is in its stream: `example` examples of its shard consumed in epoch `epoch`."""

    epoch: int = 0
    example: int = 0


def expand_files(data, suffixes=STREAM_SUFFIXES):
    """The files of `data` (a path or glob, or a list of them), globs sorted, each checked; in the given order.

    Raises:
        ValueError: a pattern that matches nothing, a missing file, another suffix.
    """
    patterns = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    files = []
    for pattern in map(os.fspath, patterns):
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ValueError(f"no file matches {pattern}")
        for path in matches:
            if not os.path.isfile(path):
                raise ValueError(f"no such file: {path}")
            if Path(path).suffix.lower() not in suffixes:
                raise ValueError(f"{path}: expected a {', '.join(suffixes)} file")
            if path not in files:
                files.append(path)
    if not files:
        raise ValueError("no data files given")
    return files


def streams_by_default(data):
    """Whether `fine_tune` streams `data` without being asked: a glob, several files, Parquet, or a file over 1 GiB.

    A single JSONL or CSV file of ordinary size is read into memory and
    shuffled whole, as before streaming existed.
    """
    if not isinstance(data, (str, os.PathLike)):
        return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(d, (str, os.PathLike)) for d in data)
    path = os.fspath(data)
    if glob.has_magic(path) or Path(path).suffix.lower() == ".parquet":
        return True
    return os.path.isfile(path) and os.path.getsize(path) > STREAM_AUTOMATICALLY_BYTES


def pair_texts(examples):
    """The batch of texts `fit` takes for `(input, target, image)` examples (the preprocessor tokenizes them)."""
    for _, _, image in examples:
        if image is not None:
            raise ValueError("streamed data holds text pairs; images are read in memory: drop --stream (`stream=`)")
    return {
        "encoder_text": [text for text, _, _ in examples],
        "decoder_text": [target for _, target, _ in examples],
    }


# The batches of `pair_texts`: `(shape, dtype)` of each array, `None` the batch axis.
PAIR_SIGNATURE = {"encoder_text": ((None,), "string"), "decoder_text": ((None,), "string")}


class ExampleStream:
    """The examples of data files as a stream of batches: shuffled in windows, one shard per process, resumable.

    Args:
        data: a `.jsonl`, `.csv` or `.parquet` file or glob, or a list of them.
        batch_size: int, the global batch; each of `shard_count` shards feeds
            `batch_size // shard_count` rows of it.
        seed: int, the file order and the windows' permutations.
        shuffle_buffer: int, records permuted together (1: file order).
        drop_remainder: bool, leave out each epoch's last incomplete global
            batch (always, with several shards, so that every process takes
            the same steps).
        shard_index, shard_count: this process' shard and how many there are
            (default: `jax.process_index()` and `jax.process_count()`).
        encoding: str, the text files' encoding.
        example: `example(record, where, path)`, a record (see
            `keras_t5gemma.data.stream_records`) made an example (default:
            an `(input, target, image)` pair, checked).
        collate: `collate(examples, keys)`, a list of examples made the
            batch that `fit` takes (default: `pair_texts`); each example's
            key `(epoch, index)` names it (`index` is its record's place in
            the epoch's sequence), to seed what is drawn for it.
        signature: the batches' structure with a `(shape, dtype name)` pair
            per array, `None` for the batch axis (default: `PAIR_SIGNATURE`).
    """

    def __init__(
        self,
        data,
        *,
        batch_size,
        seed=0,
        shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
        drop_remainder=False,
        shard_index=None,
        shard_count=None,
        encoding=DEFAULT_ENCODING,
        example=None,
        collate=None,
        signature=None,
        suffixes=STREAM_SUFFIXES,
    ):
        self.files = expand_files(data, suffixes)
        self.shard_count = training_checkpoints.process_count() if shard_count is None else shard_count
        self.shard_index = training_checkpoints.process_index() if shard_index is None else shard_index
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard {self.shard_index} of {self.shard_count} does not exist")
        if batch_size % self.shard_count:
            raise ValueError(f"the batch size {batch_size} must be a multiple of the {self.shard_count} shards")
        if shuffle_buffer < 1:
            raise ValueError(f"the shuffle buffer must hold at least one record; got {shuffle_buffer}")
        self.batch_size, self.seed, self.shuffle_buffer, self.encoding = batch_size, seed, shuffle_buffer, encoding
        self.process_batch_size = batch_size // self.shard_count
        self.drop_remainder = drop_remainder or self.shard_count > 1
        self.example = example or _pair_example
        self.collate = collate or (lambda examples, indices: pair_texts(examples))
        self.signature = signature or PAIR_SIGNATURE
        self.counts = [count_records(path, encoding) for path in self.files]
        self.total = sum(self.counts)
        # This shard's records: every `shard_count`-th, from `shard_index`.
        self.shard_size = len(range(self.shard_index, self.total, self.shard_count))
        if self.drop_remainder:
            self.steps_per_epoch = self.total // batch_size
            self.examples_per_epoch = self.steps_per_epoch * self.process_batch_size
        else:
            self.steps_per_epoch = math.ceil(self.shard_size / self.process_batch_size)
            self.examples_per_epoch = self.shard_size
        if not self.steps_per_epoch:
            raise ValueError(f"{self.source} has {self.total} examples, fewer than one batch of {batch_size}")

    @property
    def source(self):
        return self.files[0] if len(self.files) == 1 else f"{len(self.files)} files ({self.files[0]}, ...)"

    def fingerprint(self):
        """A SHA-256 of the files' paths (as given, normalised), sizes and record counts: what a resumed run must
        find again."""
        digest = hashlib.sha256()
        for path, count in zip(self.files, self.counts):
            digest.update(f"{os.path.normpath(path)}\0{os.path.getsize(path)}\0{count}\n".encode())
        return digest.hexdigest()

    def file_order(self, epoch):
        """The files' indices in the order epoch `epoch` reads them."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files)).tolist()

    def _window_start(self, epoch, window):
        """`(file order position, record in that file, global index)` of window `window`'s first record."""
        first = self.shard_index + window * self.shuffle_buffer * self.shard_count
        done = 0
        for position, file in enumerate(self.file_order(epoch)):
            if first < done + self.counts[file]:
                return position, first - done, first
            done += self.counts[file]
        return len(self.files), 0, first

    def _records(self, epoch, window):
        """`(global index, path, where, record)` of the epoch's sequence from window `window`'s first record."""
        order = self.file_order(epoch)
        position, record, index = self._window_start(epoch, window)
        for file in order[position:]:
            path = self.files[file]
            for where, value in stream_records(path, self.encoding, start=record):
                yield index, path, where, value
                index += 1
            record = 0

    def examples(self, epoch, start=0):
        """`(index, example)` of this shard in epoch `epoch`, from its `start`-th example; `index` is the record's
        place in the epoch's sequence of all shards."""
        window = start // self.shuffle_buffer
        skip = start - window * self.shuffle_buffer
        taken = window * self.shuffle_buffer
        held = []
        for index, path, where, record in self._records(epoch, window):
            if (index - self.shard_index) % self.shard_count:
                continue
            if taken == self.examples_per_epoch:
                break
            held.append((index, path, where, record))
            taken += 1
            if len(held) == self.shuffle_buffer:
                yield from self._permuted(held, epoch, window, skip)
                held, window, skip = [], window + 1, 0
        if held:
            yield from self._permuted(held, epoch, window, skip)

    def _permuted(self, held, epoch, window, skip):
        order = np.random.default_rng([self.seed, epoch, window]).permutation(len(held))
        for row in order[skip:]:
            index, path, where, record = held[row]
            yield index, self.example(record, where, path)

    def batches(self, position=StreamPosition()):
        """This shard's batches from `position` on, epoch after epoch, without end (`steps_per_epoch` per epoch)."""
        if position.example % self.process_batch_size:
            raise ValueError(
                f"a stream resumes at a batch boundary; {position.example} is not a multiple of "
                f"{self.process_batch_size}"
            )
        epoch, start = position.epoch, position.example
        while True:
            examples, indices = [], []
            for index, example in self.examples(epoch, start):
                examples.append(example)
                indices.append((epoch, index))
                if len(examples) == self.process_batch_size:
                    yield self.collate(examples, indices)
                    examples, indices = [], []
            if examples:
                yield self.collate(examples, indices)
            epoch, start = epoch + 1, 0

    def position_after(self, steps):
        """The position after `steps` batches counted from the stream's start (epochs of `steps_per_epoch`)."""
        epoch, step = divmod(steps, self.steps_per_epoch)
        return StreamPosition(epoch, min(step * self.process_batch_size, self.examples_per_epoch))

    def state(self, position):
        """`position` as a small JSON-able dict, with what resuming it needs to find again."""
        window = position.example // self.shuffle_buffer
        file, record, _ = self._window_start(position.epoch, window)
        order = self.file_order(position.epoch)
        return {
            "epoch": position.epoch,
            "example": position.example,
            "window_file": self.files[order[file]] if file < len(order) else None,
            "window_record": record,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "batch_size": self.batch_size,
            "shards": self.shard_count,
            "fingerprint": self.fingerprint(),
        }

    def position_of(self, state):
        """The `StreamPosition` of a `state` dict, checked against this stream's files and settings.

        Raises:
            ValueError: naming what differs from the stream that wrote it.
        """
        expected = {
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "batch_size": self.batch_size,
            "shards": self.shard_count,
            "fingerprint": self.fingerprint(),
        }
        changed = [
            f"{key} {state.get(key)!r} -> {value!r}" for key, value in expected.items() if state.get(key) != value
        ]
        if changed:
            raise ValueError(
                f"the saved input position was written for other data or settings ({'; '.join(changed)}); "
                "resume with the same files, seed, --shuffle-buffer, --batch-size and number of processes"
            )
        return StreamPosition(int(state["epoch"]), int(state["example"]))


def preprocessed(preprocessor, texts=None, then=None):
    """`collate` and `signature` for an `ExampleStream` whose batches are preprocessed in the stream.

    Each batch's texts (`texts(examples, keys)`, default `pair_texts`; an
    `objectives.ObjectiveBatches` for raw text) go through `preprocessor`
    eagerly, and `fit` receives model inputs `(x, y, sample_weight)` as NumPy
    arrays, which it passes through without preprocessing again. `then(x, y,
    sample_weight)` transforms them after, e.g. a packing step that puts
    several examples in one row (`training.packing.pack_examples`). The
    signature is read from one made-up example run through the same steps.

    Returns:
        `{"collate": ..., "signature": ...}`, `ExampleStream`'s options.
    """
    texts = texts or (lambda examples, keys: pair_texts(examples))

    def collate(examples, keys):
        outputs = preprocessor(texts(examples, keys))
        outputs = keras.tree.map_structure(np.asarray, tuple(keras.utils.unpack_x_y_sample_weight(outputs)))
        return tuple(then(*outputs)) if then is not None else outputs

    sample = collate([("a", "a", None)], [(0, 0)])
    signature = keras.tree.map_structure(
        lambda array: ((None, *np.shape(array)[1:]), np.asarray(array).dtype.name), sample
    )
    return {"collate": collate, "signature": signature}


class PackedStream:
    """An `ExampleStream`'s examples preprocessed and packed into batches of `stream.batch_size` rows.

    The examples come in the stream's order (shuffled windows, resumable
    positions) in chunks of `chunk`; each chunk goes through
    `preprocessor` (`stream.collate` first makes texts of it: pairs, or an
    objective's draws) and `packing.pack_batches` fills batches of a fixed
    number of rows with the next examples that fit (greedy first fit), the
    first that fits none starting the next batch. A batch thus holds a run
    of the stream's order, and a position still counts the examples
    consumed: resumed there, the stream packs the batches the run would have
    trained on, so that every example is trained on once per epoch. How
    many batches an epoch packs into depends on the lengths
    (`steps_per_epoch` is None): `fit_stream` trains an epoch at a time
    until its examples run out, and numbers checkpoints by the steps
    trained (`state` saves that count too).

    One process only: each shard would pack into its own number of steps,
    and the processes of a job must take the same ones.

    Args:
        stream: an `ExampleStream` whose `collate` gives texts (the default
            pairs, or an objective's draws); its `batch_size` counts rows.
        preprocessor: a `Seq2SeqLM` preprocessor: its sequence lengths are
            the rows' lengths.
        chunk: int, examples preprocessed at a time (default: 4 batches'
            rows); it does not change the batches.
        max_segments: optional int, at most this many examples per row.
    """

    def __init__(self, stream, preprocessor, chunk=None, max_segments=None):
        if stream.shard_count > 1:
            raise ValueError(
                "packing a stream takes one process: each of the "
                f"{stream.shard_count} shards would pack into its own number of steps"
            )
        self.stream, self.preprocessor, self.max_segments = stream, preprocessor, max_segments
        self.rows = stream.batch_size
        self.chunk = chunk or 4 * self.rows
        self.steps_per_epoch = None
        # Each iteration of `batches` notes the position after each batch it hands over.
        self.iterations = []
        # The batches' structure, from one made-up pair.
        sample = next(self._packed([self._preprocessed(pair_texts([("a", "a", None)]))]))[:3]
        self.signature = keras.tree.map_structure(
            lambda array: ((None, *np.shape(array)[1:]), np.asarray(array).dtype.name), sample
        )

    source = property(lambda self: self.stream.source)
    total = property(lambda self: self.stream.total)
    shuffle_buffer = property(lambda self: self.stream.shuffle_buffer)
    examples_per_epoch = property(lambda self: self.stream.examples_per_epoch)

    def fingerprint(self):
        return self.stream.fingerprint()

    def _preprocessed(self, texts):
        """`(x, y, sample_weight)` NumPy arrays of a batch of texts, one example per row."""
        outputs = keras.utils.unpack_x_y_sample_weight(self.preprocessor(texts))
        return keras.tree.map_structure(np.asarray, tuple(outputs))

    def _packed(self, chunks):
        return packing.pack_batches(chunks, self.rows, self.max_segments)

    def _chunks(self, epoch, start):
        examples, keys = [], []
        for index, example in self.stream.examples(epoch, start):
            examples.append(example)
            keys.append((epoch, index))
            if len(examples) == self.chunk:
                yield self._preprocessed(self.stream.collate(examples, keys))
                examples, keys = [], []
        if examples:
            yield self._preprocessed(self.stream.collate(examples, keys))

    def batches(self, position=StreamPosition()):
        """Epoch `position.epoch`'s packed batches `(x, y, sample_weight)`, from its `position.example`-th example
        to the epoch's end.

        Each batch's end, `(StreamPosition after it, whether it is the
        epoch's last)`, is appended to a list of this iteration's own,
        `iterations[-1]`, before the batch is handed over.
        """
        ends = []
        self.iterations = [*self.iterations[-1:], ends]
        batches = self._packed(self._chunks(position.epoch, position.example))
        for x, y, sample_weight, consumed in batches:
            example = position.example + consumed
            ends.append((StreamPosition(position.epoch, example), example == self.examples_per_epoch))
            yield x, y, sample_weight

    def state(self, position, step):
        """`ExampleStream.state` of `position`, with the packing and `step`, the steps trained to it."""
        return {**self.stream.state(position), "pack_rows": self.rows, "step": step}

    def position_of(self, state):
        """The `StreamPosition` of a `state` written by a packed stream with the same settings."""
        if state.get("pack_rows") != self.rows:
            raise ValueError(
                f"the saved input position was written for other settings (packed rows {state.get('pack_rows')!r}"
                f" -> {self.rows!r}); resume with the same --pack and --batch-size"
            )
        return self.stream.position_of(state)


def _pair_example(record, where, path):
    return pair_of_record(record, where, os.path.dirname(os.path.abspath(path)))


def dataset(stream, position=StreamPosition()):
    """A `tf.data.Dataset` of `stream.batches(position)` (no end; `fit` takes `steps_per_epoch` per epoch)."""
    import tensorflow as tf

    def specs(node):
        if isinstance(node, dict):
            return {key: specs(value) for key, value in node.items()}
        if isinstance(node[1], str):  # a leaf, `(shape, dtype name)`
            return tf.TensorSpec(node[0], tf.as_dtype(node[1]))
        return tuple(specs(value) for value in node)

    return tf.data.Dataset.from_generator(lambda: stream.batches(position), output_signature=specs(stream.signature))


def fit_stream(
    model,
    stream,
    *,
    epochs,
    start=StreamPosition(),
    checkpoints=None,
    checkpoint_every=None,
    callbacks=(),
    verbose="auto",
    start_step=0,
):
    """Trains `model` on `stream` from `start` to the end of epoch `epochs`; returns a `keras.callbacks.History`.

    With `checkpoints` (a `TrainingCheckpoints`), the training state and the
    stream's position are saved as global step `epoch * steps_per_epoch +
    step` every `checkpoint_every` steps (if given) and after each epoch. A
    start inside an epoch trains the rest of that epoch first (its history
    row averages only those steps), then the following epochs. A
    `PackedStream` trains an epoch per `fit`, until its batches run out;
    its steps are counted from `start_step`, the steps trained before
    `start` (the step of the checkpoint resumed).
    """
    if isinstance(stream, PackedStream):
        return _fit_packed(model, stream, epochs, start, checkpoints, checkpoint_every, callbacks, verbose, start_step)
    steps = stream.steps_per_epoch
    saver = _StreamCheckpoint(checkpoints, stream, checkpoint_every) if checkpoints is not None else None
    history = keras.callbacks.History()
    history.history, history.epoch = {}, []
    epoch, done = start.epoch, start.example // stream.process_batch_size
    while epoch < epochs:
        last = epoch + 1 if done else epochs
        if saver is not None:
            saver.offset = done
        part = model.fit(
            dataset(stream, StreamPosition(epoch, done * stream.process_batch_size)),
            epochs=last,
            initial_epoch=epoch,
            steps_per_epoch=steps - done,
            callbacks=[*([saver] if saver else []), *callbacks],
            verbose=verbose,
        )
        history.epoch += part.epoch
        for name, values in part.history.items():
            history.history.setdefault(name, []).extend(values)
        epoch, done = last, 0
    return history


class _StreamCheckpoint(keras.callbacks.Callback):
    """Saves the training state with the stream's position every `every` steps and after each epoch."""

    def __init__(self, checkpoints, stream, every):
        super().__init__()
        self.checkpoints, self.stream, self.every = checkpoints, stream, every
        self.offset, self.epoch = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.offset + batch + 1
        global_step = self.epoch * self.stream.steps_per_epoch + step
        if self.every and step < self.stream.steps_per_epoch and global_step % self.every == 0:
            self._save(StreamPosition(self.epoch, step * self.stream.process_batch_size))

    def on_epoch_end(self, epoch, logs=None):
        self._save(StreamPosition(epoch + 1, 0))

    def _save(self, position):
        step = position.epoch * self.stream.steps_per_epoch + position.example // self.stream.process_batch_size
        self.checkpoints.save(self.model, step, input_position=self.stream.state(position))


def _fit_packed(model, stream, epochs, start, checkpoints, every, callbacks, verbose, step):
    """`fit_stream` for a `PackedStream`: one `fit` per epoch, on a dataset that ends with the epoch."""
    saver = _PackedCheckpoint(checkpoints, stream, every, step) if checkpoints is not None else None
    history = keras.callbacks.History()
    history.history, history.epoch = {}, []
    epoch, example = start.epoch, start.example
    while epoch < epochs:
        with warnings.catch_warnings():
            # Keras' word for an epoch whose length it was not told, which is how a packed epoch ends.
            warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
            part = model.fit(
                dataset(stream, StreamPosition(epoch, example)),
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,  # the stream's order
                callbacks=[*([saver] if saver else []), *callbacks],
                verbose=verbose,
            )
        history.epoch += part.epoch
        for name, values in part.history.items():
            history.history.setdefault(name, []).extend(values)
        epoch, example = epoch + 1, 0
    return history


class _PackedCheckpoint(keras.callbacks.Callback):
    """Saves the training state with a `PackedStream`'s position every `every` steps and after each epoch.

    The position after a step is the one the batch trained on noted
    (`PackedStream.iterations`: Keras may read a first iteration of the data
    to see its structure; the one trained on is the last).
    """

    def __init__(self, checkpoints, stream, every, step):
        super().__init__()
        self.checkpoints, self.stream, self.every, self.step = checkpoints, stream, every, step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        position, last = self.stream.iterations[-1][batch]
        # An epoch's last step is saved by `on_epoch_end`, as the next epoch's start.
        if self.every and not last and self.step % self.every == 0:
            self._save(position)

    def on_epoch_end(self, epoch, logs=None):
        self._save(StreamPosition(epoch + 1, 0))

    def _save(self, position):
        self.checkpoints.save(self.model, self.step, input_position=self.stream.state(position, self.step))
