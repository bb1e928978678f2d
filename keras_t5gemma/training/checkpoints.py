"""Sharded training checkpoints (Orbax) and the run folders of `fine-tune`.

A checkpoint holds a compiled model's whole training state: weights,
optimizer slots and step counter, and random-seed states. On the JAX backend every process writes the
shards of each array it holds (Orbax with tensorstore), nothing is gathered to
one host, and `restore` reads them straight into the layouts of the model it
is given, so a checkpoint saved on one mesh restores onto another (8 devices
-> 4, two processes -> one).

Orbax writes each checkpoint into a temporary folder beside its final one and
renames it when every process has finished: a crash leaves no half-written
checkpoint under a step's name, and `latest_step` only sees complete ones.
A SIGINT that arrives while a checkpoint is written is held until the write
has finished (`interrupts_deferred`).

Faults: a save checks the free space first and fails with one `OSError`
(`ENOSPC`) before writing; a save that fails anyway (the disk filled
meanwhile, a quota) removes its temporary folder and raises one `OSError`,
and Orbax's background threads print nothing for it (their log records are
dropped when the error is raised, printed when the save succeeds).
A checkpoint is trusted only once read whole: `restore` of the latest
checkpoint sets a damaged or incomplete one aside (`STEP.damaged`), warns
naming it, and restores the newest one that reads.

Run folders: `fine-tune --output OUT` keeps each run's checkpoints in
`OUT/runs/run_NNN/checkpoints/STEP/`, next to the run's settings
(`OUT/runs/run_NNN/run.json`). A new run takes a new number; a run only
prunes checkpoints it wrote itself.

The CLI's `fine-tune --resume` restores the last checkpoint of a run and
continues with `fit(..., initial_epoch=step)`.

Input positions: a streamed run (`training.input_pipeline`) saves with each
checkpoint the position of its input stream, a small JSON file
`STEP.input.json` beside the checkpoint's folder (`input_position(step)`),
written before the checkpoint is: a complete checkpoint always has its
position. Orbax ignores the files; those of pruned checkpoints are removed.
"""

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import warnings

import keras
import numpy as np

from keras_t5gemma.utils.safe_files import atomic_file
from keras_t5gemma.utils.safe_files import check_free_space
from keras_t5gemma.utils.safe_files import check_not_in_use

# Orbax writes a checkpoint into `STEP.orbax-checkpoint-tmp...`, then renames it.
PARTIAL_SAVE_MARK = ".orbax-checkpoint-tmp"
# A checkpoint that failed to read is renamed `STEP.damaged` (kept for a look; Orbax no longer sees a step).
DAMAGED_MARK = ".damaged"
# The input stream's position saved with checkpoint STEP, as `STEP.input.json` beside it.
INPUT_POSITION_SUFFIX = ".input.json"
RUNS_FOLDER = "runs"
RUN_SETTINGS = "run.json"
_RUN_NAME = re.compile(r"run_(\d{3,})$")


# === Processes ===


def process_count():
    """Processes in the job (`keras.distribution.initialize` makes it more than one)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def process_index():
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def agree(value):
    """Process 0's integer `value` on every process (the value itself with one process)."""
    if process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


@contextlib.contextmanager
def interrupts_deferred():
    """Holds a SIGINT that arrives inside the block and raises it when the block ends.

    A checkpoint save is then either finished or, when the interrupt comes
    before it, never started. Outside the main thread (where Python cannot
    install a handler) the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# === Checkpoints ===


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise ImportError(
            "sharded checkpoints need the `orbax-checkpoint` package (`pip install orbax-checkpoint`)"
        ) from error
    return ocp


def _training_variables(model):
    """`{part: {name: variable}}` of what a checkpoint holds.

    Names are variable paths; an optimizer slot's path loses its first part,
    the optimizer's own name, which Keras numbers per process (`adam_w_2`):
    a checkpoint then fits any model built the same way. Metric totals are
    left out: they restart every epoch.
    """
    if not model.optimizer or not model.optimizer.built:
        raise ValueError(
            "a training checkpoint holds the optimizer's state: compile the model and build its optimizer "
            "(`model.optimizer.build(model.trainable_variables)`, or train a step) first"
        )
    parts = {
        "trainable_variables": {v.path: v for v in model.trainable_variables},
        "non_trainable_variables": {v.path: v for v in model.non_trainable_variables},
        "optimizer_variables": {v.path.split("/", 1)[-1]: v for v in model.optimizer.variables},
    }
    for part, variables in parts.items():
        count = len(getattr(model, part) if part != "optimizer_variables" else model.optimizer.variables)
        if len(variables) != count:
            raise ValueError(f"the model's {part} do not have one path each; they cannot be checkpointed")
    return parts


def _state_tree(model):
    """The arrays to save, nested by the parts of their names (Orbax stores a nested dict)."""
    tree = {}
    for part, variables in _training_variables(model).items():
        for name, variable in variables.items():
            node = tree.setdefault(part, {})
            *folders, leaf = name.split("/")
            for folder in folders:
                node = node.setdefault(folder, {})
            node[leaf] = variable.value
    return tree


def _assign(model, tree):
    for part, variables in _training_variables(model).items():
        for name, variable in variables.items():
            node = tree[part]
            for key in name.split("/"):
                node = node[key]
            variable.assign(node)


class TrainingCheckpoints:
    """Numbered Orbax checkpoints of a model's training state in one folder.

    Every process of a multi-host job creates the same `TrainingCheckpoints`
    and calls `save` and `restore` together; each writes and reads only its
    own shards.

    Args:
        directory: str, the folder of this run's checkpoints (created).
        keep: int or None, how many of the latest checkpoints to keep; older
            ones this object wrote are deleted. `None` keeps all.

    Example:
    ```python
    import tempfile

    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(optimizer=keras.optimizers.AdamW(1e-3))
    seq_2_seq_lm.optimizer.build(seq_2_seq_lm.trainable_variables)
    checkpoints = TrainingCheckpoints(tempfile.mkdtemp(), keep=2)
    checkpoints.save(seq_2_seq_lm, step=1)
    assert checkpoints.restore(seq_2_seq_lm) == 1  # the latest step
    # In `fit`: `callbacks=[checkpoints.callback()]` saves after each epoch.
    ```
    """

    def __init__(self, directory, keep=None):
        if keras.backend.backend() != "jax":
            raise ValueError(f"sharded checkpoints need the JAX backend; this is {keras.backend.backend()}")
        ocp = _orbax()
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self._discard_partial_saves()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )
        self._ocp = ocp

    def _discard_partial_saves(self):
        """Removes the temporary folders (`STEP.orbax-checkpoint-tmp*`) of saves that a kill cut short."""
        if process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if PARTIAL_SAVE_MARK in name:
                    shutil.rmtree(os.path.join(self.directory, name))
        agree(0)

    def steps(self):
        """Steps of the complete checkpoints, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self):
        """The last complete checkpoint's step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step):
        return os.path.join(self.directory, str(step))

    def save(self, model, step, input_position=None):
        """Writes `model`'s training state as checkpoint `step`; returns its folder.

        Refuses a step that already has a checkpoint. A SIGINT during the
        write takes effect once the checkpoint is complete. `input_position`,
        a JSON-able dict (an input stream's `state`), is written first as
        `STEP.input.json` (`input_position(step)` reads it).

        Raises:
            OSError: too little free space (checked first, `ENOSPC`), or a
                write that failed; no part of the checkpoint is left.
        """
        if step in self.steps():
            raise ValueError(f"{self.path(step)} already holds a checkpoint; it is not overwritten")
        with interrupts_deferred():
            state = _state_tree(model)
            self._check_free_space(state, step)
            if input_position is not None and process_index() == 0:
                with atomic_file(self._input_position_path(step), "w", encoding="utf-8") as file:
                    json.dump(input_position, file, indent=2, sort_keys=True)
            try:
                with _orbax_logs_held(self.directory):
                    self._manager.save(step, args=self._ocp.args.StandardSave(state))
                    self._manager.wait_until_finished()
            except Exception as error:
                self._discard_partial_saves()
                raise _write_error(error, self.path(step)) from None
            self._discard_unused_input_positions()
        return self.path(step)

    def _input_position_path(self, step):
        return os.path.join(self.directory, f"{step}{INPUT_POSITION_SUFFIX}")

    def input_position(self, step):
        """The input position saved with checkpoint `step` (a dict), or None if it has none."""
        path = self._input_position_path(step)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as file:
            return json.load(file)

    def _discard_unused_input_positions(self):
        """Removes the input positions of checkpoints that are gone (pruned, or a save that failed)."""
        if process_index() != 0:
            return
        steps = {str(step) for step in self.steps()}
        for name in os.listdir(self.directory):
            if name.endswith(INPUT_POSITION_SUFFIX) and name.removesuffix(INPUT_POSITION_SUFFIX) not in steps:
                os.remove(os.path.join(self.directory, name))

    def _check_free_space(self, state, step):
        """Process 0 compares the checkpoint's bytes with the free space; every process gets its answer."""
        refusal = None
        if process_index() == 0:
            arrays = list(_leaves(state))
            needed = 256 * 1024 + sum(math.prod(array.shape) * array.dtype.itemsize + 4096 for array in arrays)
            try:
                check_free_space(self.directory, needed, f"checkpoint {self.path(step)}")
            except OSError as error:
                refusal = error
        if agree(refusal is not None):
            raise refusal or OSError(errno.ENOSPC, f"process 0 has no space for the checkpoint {self.path(step)}")

    def restore(self, model, step=None, warn=None):
        """Reads checkpoint `step` (default: the latest that reads) into `model`; returns the step.

        Each array is read in the layout of `model`'s variable (the current
        distribution's), whatever mesh wrote it. The model must be built,
        compiled and its optimizer built, with the same variables as the model
        that was saved (the same LoRA rank, for example).

        Without `step`, a checkpoint that cannot be read whole (a file cut
        short or damaged) is renamed `STEP.damaged`, `warn(message)` names
        it (default: `warnings.warn`), and the checkpoint before it is
        tried. The model is changed only by a checkpoint read whole.

        Raises:
            ValueError: no complete checkpoint, none that reads (one line
                naming them), or one saved from a model with other variables.
        """
        if step is not None:
            if step not in self.steps():
                raise ValueError(f"{self.directory} has no complete checkpoint {step}")
            return self._restore_step(model, step)
        steps = self.steps()
        if not steps:
            raise ValueError(f"{self.directory} has no complete checkpoint")
        warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        damaged = []
        for candidate in reversed(steps):
            try:
                return self._restore_step(model, candidate)
            except CheckpointMismatchError:
                raise
            except Exception as error:
                aside = self._set_aside(candidate)
                damaged.append(aside)
                earlier = " and restoring the one before" if candidate != steps[0] else ""
                reason = _reason(error)
                warn(
                    f"the checkpoint {self.path(candidate)} cannot be read ({reason}); set it aside as {aside}{earlier}"
                )
        raise ValueError(
            f"no checkpoint in {self.directory} can be read: {', '.join(damaged)} are damaged or incomplete "
            "(set aside); start a new run"
        )

    def _restore_step(self, model, step):
        import jax

        state = _state_tree(model)
        target = jax.tree.map(
            lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding), state
        )
        with _orbax_logs_held(self.directory):
            saved = self._manager.item_metadata(step)
            _check_same_variables(saved, target, self.path(step))
            restored = self._manager.restore(step, args=self._ocp.args.StandardRestore(target))
        _assign(model, restored)
        return step

    def _set_aside(self, step):
        """Renames checkpoint `step` to `STEP.damaged` (numbered if taken); returns the new folder."""
        aside = self.path(step) + DAMAGED_MARK
        if process_index() == 0:
            number = 1
            while os.path.lexists(aside):
                number += 1
                aside = f"{self.path(step)}{DAMAGED_MARK}-{number}"
            os.rename(self.path(step), aside)
        agree(0)
        self._manager.reload()
        return aside

    def callback(self, step_offset=0):
        """A Keras callback that saves after each epoch, as step `epoch + 1 + step_offset`."""
        return _EpochCheckpoint(self, step_offset)

    def close(self):
        self._manager.close()


class CheckpointMismatchError(ValueError):
    """A checkpoint that reads, but holds other variables than the model's (not damage: nothing is set aside)."""


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


class _HeldRecords(logging.Filter):
    """Holds the `absl` logger's records (Orbax logs its threads' failures there, tracebacks included)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        self.records.append(record)
        return False


class _ReportedFailures(logging.Filter):
    """Drops `asyncio`'s late reports of Orbax write tasks that failed in a folder whose failure was raised.

    Orbax's write tasks that failed beside the one that raised are reported
    by `asyncio` when its loop collects them, after the save has returned
    ("Task exception was never retrieved", with a traceback).
    """

    def __init__(self):
        super().__init__()
        self.folders = set()

    def filter(self, record):
        message = record.getMessage()
        return not ("exception was never retrieved" in message and any(folder in message for folder in self.folders))


_REPORTED_FAILURES = _ReportedFailures()


@contextlib.contextmanager
def _orbax_logs_held(folder):
    """Orbax's log records of the block: dropped if it raises (the caller reports the error), else let through.

    Orbax logs its threads' failures to `absl` (see also `_ReportedFailures`
    for those of `asyncio`, for writes under `folder`).
    """
    logger = logging.getLogger("absl")
    held = _HeldRecords()
    logger.addFilter(held)
    try:
        yield
    except BaseException:
        _REPORTED_FAILURES.folders.add(folder)
        asyncio_logger = logging.getLogger("asyncio")
        if _REPORTED_FAILURES not in asyncio_logger.filters:
            asyncio_logger.addFilter(_REPORTED_FAILURES)
        raise
    finally:
        logger.removeFilter(held)
    for record in held.records:
        logger.handle(record)


def _reason(error):
    """The first line of an Orbax or TensorStore error, shortened; its cause's when it says more."""
    cause = error.__cause__ or error
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _write_error(error, where):
    """One `OSError` for a checkpoint write the filesystem refused (the system's error code, as TensorStore gives
    it); any other error as it is."""
    if isinstance(error, OSError) and error.errno:
        code = error.errno
    else:
        match = re.search(r"os_error_code='?(\d+)", str(error))
        if not match:
            return error  # not the filesystem's: raised as it is
        code = int(match.group(1))
    return OSError(code, f"could not write the checkpoint {where} ({os.strerror(code)}); no part of it was kept")


def _check_same_variables(saved, target, where):
    """Names the variables the checkpoint and the model do not share, and the first shape that differs."""
    import jax

    def flat(tree):
        return {
            "/".join(str(getattr(key, "key", key)) for key in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    saved, target = flat(saved), flat(target)
    only_saved, only_model = sorted(set(saved) - set(target)), sorted(set(target) - set(saved))
    if only_saved or only_model:

        def some(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        raise CheckpointMismatchError(
            f"{where} does not fit the model (saved with other settings, such as the LoRA rank?): "
            + "; ".join(
                [f"it holds {len(only_saved)} variable(s) the model lacks: {some(only_saved)}"] * bool(only_saved)
                + [f"it lacks {len(only_model)} variable(s) of the model: {some(only_model)}"] * bool(only_model)
            )
        )
    for name in sorted(saved):
        saved_shape = tuple(getattr(saved[name], "shape", ()))
        if saved_shape != tuple(target[name].shape):
            raise CheckpointMismatchError(
                f"{where}: {name} has shape {saved_shape}; the model's is {tuple(target[name].shape)}"
            )


class _EpochCheckpoint(keras.callbacks.Callback):
    def __init__(self, checkpoints, step_offset):
        super().__init__()
        self.checkpoints = checkpoints
        self.step_offset = step_offset
        self.saved = []

    def on_epoch_end(self, epoch, logs=None):
        self.saved.append(self.checkpoints.save(self.model, epoch + 1 + self.step_offset))


# === Run folders ===


def _runs(output):
    """`{number: folder}` of the run folders under `output/runs`."""
    folder = os.path.join(output, RUNS_FOLDER)
    if not os.path.isdir(folder):
        return {}
    runs = {}
    for name in os.listdir(folder):
        match = _RUN_NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name, RUN_SETTINGS)):
            runs[int(match.group(1))] = os.path.join(folder, name)
    return runs


def latest_run(output):
    """The folder of the newest run under `output`, or None."""
    runs = _runs(output)
    return runs[max(runs)] if runs else None


def read_run_settings(run):
    with open(os.path.join(run, RUN_SETTINGS), encoding="utf-8") as file:
        return json.load(file)


def check_output_folder(output, overwrite=False, resume=False):
    """Refuses to write into a non-empty `output` without `overwrite` or `resume`.

    Raises:
        ValueError: naming the folder and the options that allow it.
        FolderInUseError: another process is writing `output` (a `fine-tune`, `save_to_preset`, ...).
    """
    check_not_in_use(output, "--output folder")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file, not a folder")
    if not os.path.isdir(output) or not os.listdir(output) or overwrite:
        return
    if resume:
        if latest_run(output) is None:
            raise ValueError(f"--resume: {output} holds no fine-tuning run (no {RUNS_FOLDER}/run_NNN/{RUN_SETTINGS})")
        return
    raise ValueError(
        f"--output {output} is not empty; pass --resume to continue its last run, --overwrite to write a new run "
        "and the final model into it (earlier runs are kept), or choose an empty folder"
    )


def start_run(output, settings):
    """Creates the next `output/runs/run_NNN` folder with `settings` in `run.json`; returns its path.

    With several processes, process 0 picks the number and every process
    uses it.
    """
    number = agree(max(_runs(output), default=0) + 1 if process_index() == 0 else 0)
    run = os.path.join(output, RUNS_FOLDER, f"run_{number:03d}")
    if process_index() == 0:
        # `mkdir` fails if a concurrent run took the number: no two runs share a folder.
        os.makedirs(os.path.dirname(run), exist_ok=True)
        os.mkdir(run)
        write_json_atomically(os.path.join(run, RUN_SETTINGS), settings)
    agree(0)  # the other processes wait for the folder
    return run


def write_json_atomically(path, value):
    """Writes JSON beside `path`, then renames it over `path`."""
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
