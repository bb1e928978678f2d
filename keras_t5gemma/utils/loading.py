"""Filling a model's variables straight from a checkpoint: no initializer runs, shards go to their devices.

Every loader builds its model with `built_without_values` (Keras variables
with paths, shapes, dtypes and layouts but no value) and then gives each
variable its value once with `fill`: the checkpoint tensor in the variable's
dtype, or, when a distribution lays the variable out over devices, each
device's part read on its own (`jax.make_array_from_callback`), so that no
process holds a whole tensor it only keeps a shard of. Variables the
checkpoint does not hold (a seed generator's state, a new classifier head)
get their initializer afterwards (`initialize_unfilled`).

`LoadProgress` is the progress bar of a load (bytes read, bytes/s) and its
closing line (seconds, the memory the model holds).
"""

import collections
import contextlib
import math
import mmap
import os
import sys
import threading
import time

import keras
import ml_dtypes
import numpy as np

_patch_lock = threading.Lock()


_deferring = threading.local()


def _initialize_or_defer(original):
    def initialize(variable, initializer):
        if getattr(_deferring, "active", False):
            # Left empty, as a stateless scope leaves it: `fill` or `initialize_unfilled` gives the value.
            variable._initializer = initializer
            variable._value = None
            return
        original(variable, initializer)

    initialize.original = original
    return initialize


def built_without_values(build):
    """`build()`'s model with no initializer run: its variables have paths, shapes and dtypes, no values.

    Variables made from an initializer are left empty for `fill` (those still
    empty after the load need `initialize_unfilled`); a variable made from a
    value (KerasHub's end-of-image vectors, an optimizer's counters) keeps
    it. Only this thread's variables are affected; on JAX only (other
    backends build as usual, initializers included). With a distribution set,
    each variable gets its layout, so that `fill` (and Keras' own `assign`,
    which reloading a Keras preset calls) places its value on its devices.
    """
    if keras.backend.backend() != "jax":
        # TensorFlow's and torch's variables need their backend tensor from the start (Keras' loading
        # finds none to assign into otherwise): they are initialized, then overwritten by `fill`.
        return build()
    variable_class = keras.Variable
    with _patch_lock:
        if not hasattr(variable_class._initialize_with_initializer, "original"):
            variable_class._initialize_with_initializer = _initialize_or_defer(
                variable_class._initialize_with_initializer
            )
    outer = getattr(_deferring, "active", False)
    _deferring.active = True
    try:
        model = build()
    finally:
        _deferring.active = outer
    if keras.distribution.distribution() is not None:
        for variable in model.variables:
            variable._initialize_layout()
    return model


def mapped_array(path, start, stop, dtype, shape, whole=True):
    """The bytes `[start, stop)` of file `path` as a read-only array, mapped for it alone.

    No copy: the array views the file's pages (from the page cache), and the
    map is released when the array is freed, so that the pages one tensor
    touched do not stay resident beside the model. Loading copies it once,
    into the model's buffer; reading into an array of its own first made a
    second copy, about a fifth of a 1b-1b load. `whole`: every page is read
    in at once (the whole tensor is wanted); otherwise only the pages a
    slice of the array touches are read.
    """
    # A map starts on a page boundary; the view skips to the first byte.
    first_page = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if whole else 0)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if stop > size:
            # Reading past the end of a map would kill the process (SIGBUS), not raise.
            raise ValueError(f"`{path}` is truncated: it has {size} bytes, and a tensor lies at {start}-{stop}.")
        mapped = mmap.mmap(file.fileno(), stop - first_page, flags=flags, prot=mmap.PROT_READ, offset=first_page)
    return np.frombuffer(mapped, dtype, count=math.prod(shape), offset=start - first_page).reshape(shape)


def _mapped_h5_dataset(dataset):
    """A Keras weights file's dataset as `mapped_array`, or `None` where it is not stored plainly in a file.

    Keras writes bfloat16 as 2-byte opaque values with a `dtype` attribute.
    """
    import h5py

    if not isinstance(dataset, h5py.Dataset) or dataset.file.driver != "sec2" or dataset.size == 0:
        return None
    if dataset.chunks is not None or dataset.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
        return None
    offset = dataset.id.get_offset()
    if offset is None or dataset.id.get_storage_size() != dataset.nbytes or not os.path.isfile(dataset.file.filename):
        return None
    if dataset.attrs.get("dtype") == "bfloat16" and dataset.dtype.itemsize == 2:
        dtype = np.dtype(ml_dtypes.bfloat16)
    elif dataset.dtype.kind in "fiub" and dataset.dtype.byteorder in "<=|":
        dtype = dataset.dtype
    else:
        return None
    return mapped_array(dataset.file.filename, offset, offset + dataset.nbytes, dtype, dataset.shape)


def _mapped_or_read(original):
    def getitem(store, key):
        if getattr(_filling, "active", False):
            import h5py

            # The open group of the variables being read (named so since Keras 3.11; `group` before).
            group = getattr(store, "_h5_entry_group", getattr(store, "group", None))
            if isinstance(group, h5py.Group) and key in group:
                mapped = _mapped_h5_dataset(group[key])
                if mapped is not None:
                    return mapped
        return original(store, key)

    getitem.original = original
    return getitem


def _assign_or_fill(original):
    def assign(variable, value):
        if getattr(_filling, "active", False) and is_unfilled(variable) and _same_shape(variable, value):
            fill(variable, lambda: value)
            # Not `variable.value`: while its copy is pending (`copies_in_parallel`) that runs the initializer.
            return value
        return original(variable, value)

    assign.original = original
    return assign


def _same_shape(variable, value):
    shape = getattr(value, "shape", None)
    return shape is not None and tuple(shape) == tuple(variable.shape)


_filling = threading.local()


@contextlib.contextmanager
def fills_on_assign():
    """Inside, `assign` to a variable left empty by `built_without_values` is a `fill` (this thread only).

    Keras' `load_weights` assigns each saved value; an empty variable then
    gets it as `fill` gives it (one copy to the backend, laid out on its
    devices under a distribution) rather than through Keras' conversion,
    which copies a bfloat16 array twice. A value of another shape goes to
    Keras' `assign`, which names the mismatch. The values Keras reads from
    an `.h5` weights file on disk are views of the file's pages
    (`mapped_array`) rather than copies, where the file stores them plainly.
    """
    from keras.src.saving import saving_lib

    # Where Keras reads a saved value: `H5IOStore` (Keras 3.11 on), `H5Entry` before.
    h5_reader = getattr(saving_lib, "H5IOStore", None) or saving_lib.H5Entry
    variable_class = keras.Variable
    with _patch_lock:
        if not hasattr(variable_class.assign, "original"):
            variable_class.assign = _assign_or_fill(variable_class.assign)
        if not hasattr(h5_reader.__getitem__, "original"):
            h5_reader.__getitem__ = _mapped_or_read(h5_reader.__getitem__)
    outer = getattr(_filling, "active", False)
    _filling.active = True
    try:
        yield
    finally:
        _filling.active = outer


def is_unfilled(variable):
    return getattr(variable, "_value", True) is None


def numpy_dtype(dtype):
    """The NumPy dtype of a Keras dtype name (`"bfloat16"` through `ml_dtypes`)."""
    name = keras.backend.standardize_dtype(dtype)
    return np.dtype(getattr(ml_dtypes, name, name))


def _sharding(variable):
    """The JAX sharding of `variable`'s layout, or `None` when it is not laid out over devices."""
    layout = getattr(variable, "_layout", None)
    if layout is None:
        return None
    return getattr(layout, "backend_layout", layout)


def read_in_parts(variable):
    """Whether `fill` reads `variable` one device's part at a time (given `read_part`): empty and laid out."""
    return is_unfilled(variable) and _sharding(variable) is not None


def fill(variable, read, read_part=None):
    """Gives `variable` its value from a checkpoint, cast to its dtype, without running its initializer.

    Args:
        variable: a Keras variable, empty (`built_without_values`) or not
            (then it is assigned).
        read: callable `() -> array`, the whole value in the variable's layout.
        read_part: optional callable `(index) -> array`, the part at `index`
            (a tuple of slices of the variable's shape). With it, a variable
            laid out over devices gets each device's part read on its own.
    """
    dtype = numpy_dtype(variable._dtype)
    if read_part is not None and read_in_parts(variable):
        import jax

        parts = {}

        def part(index):
            # Devices holding the same part (replicas) share one read.
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in parts:
                parts[key] = np.asarray(read_part(index)).astype(dtype, copy=False)
            return parts[key]

        sharding = _sharding(variable)
        indices = sharding.addressable_devices_indices_map(tuple(variable.shape))
        # Each device's buffer a copy of its own, never the file's pages (see `_to_tensor`).
        shards = [_device_copy(part(index), device) for device, index in indices.items()]
        variable._value = jax.make_array_from_single_device_arrays(tuple(variable.shape), sharding, shards)
        variable._initializer = None
        return
    value = read()
    if not _is_jax_array(value):  # a JAX array (the int8 values quantize-on-load computes) stays where it is
        value = np.asarray(value)
        copies = getattr(_copying, "active", None)
        if copies is not None and is_unfilled(variable):
            copies.submit(variable, lambda: _to_tensor(variable, value.astype(dtype, copy=False)), value.nbytes)
            return
    value = _to_tensor(variable, value.astype(dtype, copy=False))
    if not is_unfilled(variable):
        variable.assign(value)
        return
    _initialize(variable, value)


def _initialize(variable, tensor):
    variable._initialize(tensor)
    variable._initializer = None


_copying = threading.local()


@contextlib.contextmanager
def copies_in_parallel(workers=2, ahead_bytes=256 << 20):
    """Inside, `fill` hands each value's copy into the backend to `workers` threads (JAX only).

    The copy into JAX (casting, and transposing torch's `[out, in]` linear
    weights blockwise) is most of a load's time and releases the GIL: two
    threads did 8 such 52 MB tensors in 128 ms against 204 ms in one. Each
    variable gets its value in this thread, oldest first, once more than
    `workers` copies are pending, or more than one holding over `ahead_bytes`
    (so that a large tensor is not joined by more than one other's pages). On
    leaving, every pending copy is finished (dropped if the block raised).
    """
    if keras.backend.backend() != "jax" or getattr(_copying, "active", None) is not None:
        yield
        return
    copies = _ParallelCopies(workers, ahead_bytes)
    _copying.active = copies
    try:
        yield
    except BaseException:
        copies.abandon()
        raise
    else:
        copies.finish()
    finally:
        _copying.active = None


class _ParallelCopies:
    def __init__(self, workers, ahead_bytes):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fill")
        self._pending = collections.deque()  # (variable, future, bytes)
        self._bytes = 0
        self.workers = workers
        self.ahead_bytes = ahead_bytes

    def submit(self, variable, copy, nbytes):
        """Runs `copy()` (the backend tensor of a value of `nbytes`) on a worker; `variable` gets it later."""
        self._pending.append((variable, self._pool.submit(copy), nbytes))
        self._bytes += nbytes
        while len(self._pending) > self.workers or (len(self._pending) > 1 and self._bytes > self.ahead_bytes):
            self._finish_oldest()

    def _finish_oldest(self):
        variable, future, nbytes = self._pending.popleft()
        self._bytes -= nbytes
        _initialize(variable, future.result())

    def finish(self):
        try:
            while self._pending:
                self._finish_oldest()
        finally:
            self.abandon()

    def abandon(self):
        """Waits for the copies running, drops the rest; their variables stay empty."""
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _is_jax_array(value):
    return "jax" in sys.modules and isinstance(value, sys.modules["jax"].Array)


def _to_tensor(variable, value):
    """`value` (a NumPy array in `variable`'s dtype, or a JAX array) as a backend tensor, copied once.

    Keras' conversion of a bfloat16 array on JAX copies it twice
    (`jnp.asarray(x).astype(dtype)`); `jax.device_put` copies it once. The
    copy is never skipped for a view of a mapped file (`mapped_array`): on
    CPU, JAX (and torch) would keep an aligned array's memory as the
    variable's, so the model would hold the file's pages, and a file
    rewritten in place (`save_weights` over it truncates it first) would
    kill the process with SIGBUS on the next read of that variable.
    """
    if keras.backend.backend() == "jax":
        return value if _is_jax_array(value) else _device_copy(value)
    if isinstance(value, np.ndarray) and _views_a_mapped_file(value):
        value = np.array(value)
    return variable._convert_to_tensor(value, dtype=variable._dtype)


def _device_copy(array, device=None):
    """NumPy `array` as a JAX array of its own memory on `device`, copied once."""
    import jax

    tensor = jax.device_put(array, device)
    # JAX's CPU client keeps an aligned array's memory (`may_alias=False` does not stop it for NumPy input).
    if tensor.unsafe_buffer_pointer() == array.ctypes.data:
        # Waited for, so that the file's pages are let go of now, not beside the next tensors' copies.
        tensor = tensor.copy().block_until_ready()
    return tensor


def _views_a_mapped_file(array):
    """Whether NumPy `array` views the pages of a mapped file (`mapped_array`, `np.memmap`)."""
    base = array
    while isinstance(base, (np.ndarray, memoryview)) and not isinstance(base, np.memmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    return isinstance(base, (mmap.mmap, np.memmap))


def fill_from_values(variable, value):
    """`fill` with a value already read."""
    fill(variable, lambda: value)


def initialize_unfilled(model):
    """Runs the initializer of each of `model`'s variables that no checkpoint tensor filled; their paths."""
    paths = []
    for variable in model.variables:
        if is_unfilled(variable):
            variable._initialize_with_initializer(variable._initializer)
            variable._initializer = None
            paths.append(variable.path)
    return paths


def model_bytes(model):
    """The bytes `model`'s variables hold (each variable's full shape and dtype)."""
    return sum(int(np.prod(v.shape)) * numpy_dtype(v._dtype).itemsize for v in model.variables)


# Set (to anything but "" or "0") to silence loading bars by default: `keras-t5gemma --quiet` sets it.
QUIET_VARIABLE = "KERAS_T5GEMMA_QUIET"


def progress_wanted(progress):
    """Whether a load shows its bar: `progress` if a bool; by default in a terminal or a notebook.

    Not by default under pytest, nor with `KERAS_T5GEMMA_QUIET` set.
    """
    if isinstance(progress, bool):
        return progress
    if progress is not None or "PYTEST_CURRENT_TEST" in os.environ:
        return False
    if os.environ.get(QUIET_VARIABLE, "") not in ("", "0"):
        return False
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _human(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000


class LoadProgress:
    """A load's progress: bytes read against the total, bytes/s, and one closing line.

    Args:
        total_bytes: the bytes the load will read.
        label: what is loaded, for the closing line.
        progress: the `progress` backbone option: `None` (a bar in a terminal
            or a notebook, none in tests), `True`, `False`, or a callable
            advanced once per tensor (no bar then).
        stream: where the bar and the line go (standard error).

    Example:
    >>> bar = LoadProgress(2_000_000, "a model", progress=False)
    >>> bar.advance(1_000_000)
    >>> bar.done(model_bytes=2_000_000)
    """

    def __init__(self, total_bytes, label, progress=None, stream=None):
        self.total = max(int(total_bytes), 1)
        self.label = label
        self.callback = progress if callable(progress) else None
        self.shown = progress_wanted(progress)
        self.stream = stream or sys.stderr
        self.read = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def advance(self, nbytes):
        """One tensor of `nbytes` read."""
        self.read += int(nbytes)
        if self.callback is not None:
            self.callback(1)
        now = time.perf_counter()
        if self.shown and (now - self._last_draw > 0.1 or self.read >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now):
        fraction = min(self.read / self.total, 1.0)
        filled = int(30 * fraction)
        rate = self.read / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r[{'=' * filled}{'.' * (30 - filled)}] {_human(self.read)} / {_human(self.total)} {_human(rate)}/s"
        )
        self.stream.flush()

    def done(self, model_bytes):
        """Ends the bar with one line: the time taken and the memory the model holds."""
        if not self.shown:
            return
        seconds = time.perf_counter() - self.started
        self.stream.write(
            f"\rLoaded {self.label} in {seconds:.1f} s ({_human(self.read / max(seconds, 1e-9))}/s); "
            f"its weights hold {_human(model_bytes)}.{' ' * 20}\n"
        )
        self.stream.flush()


@contextlib.contextmanager
def progress_of(total_bytes, label, progress, model_of):
    """A `LoadProgress` whose closing line is written when the block ends without error."""
    bar = LoadProgress(total_bytes, label, progress)
    yield bar
    bar.done(model_bytes(model_of()))
