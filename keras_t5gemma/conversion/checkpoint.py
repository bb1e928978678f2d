"""Reading Hugging Face T5Gemma 2 checkpoints: files, config and tensors.

The `safetensors` library opens and checks each file (its header, offsets and
size) and reads the dtypes NumPy has no view for. Every other tensor, or a
device's part of one, is an array viewing the file's own pages, mapped for
that tensor alone (`utils.loading.mapped_array`): the library can only copy a
tensor into a fresh array, and that copy, besides the one into the model's
buffer, cost 2.3 s of a 10 s 1b-1b load. Each map is released with its array,
so the pages a read touched never stay resident beside the model (a map held
open for the whole load would keep them all).
"""

import concurrent.futures
import contextlib
import json
import os
import struct
import threading

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open

from keras_t5gemma.conversion.config import check_t5gemma2_config
from keras_t5gemma.utils.hub import fetch_file
from keras_t5gemma.utils.hub import read_json_file
from keras_t5gemma.utils.loading import mapped_array

# Allocations above this size get their own memory mapping (see below).
_MMAP_THRESHOLD = 1 << 20
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The NumPy dtypes of the safetensors dtypes read as mapped views (others are read by the library).
_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}


def return_freed_memory_to_the_system():
    """Makes glibc give large freed buffers back to the system at once.

    A load reads one tensor after another into buffers of their own. glibc
    serves allocations above a threshold with their own memory mappings, but
    raises that threshold each time such a buffer is freed, so later tensors
    land on its heap, whose freed space it keeps: converting the 270m-270m
    model then peaked at 3.1x its weights. A fixed threshold keeps the peak
    near one copy of the model. Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, _MMAP_THRESHOLD)


class SafetensorsFile:
    """A `.safetensors` file, read one tensor (or one part of a tensor) at a time.

    Example:
    >>> checkpoint = SafetensorsFile("model.safetensors")  # doctest: +SKIP
    >>> checkpoint.read("model.encoder.norm.weight").shape  # doctest: +SKIP
    (640,)
    """

    def __init__(self, path):
        self.path = path
        with self._open():  # the library checks the header against the file
            pass
        with open(self.path, "rb") as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_bytes))
        start = 8 + header_bytes
        # name -> (shape, safetensors dtype, first byte, end byte in the file)
        self._entries = {
            name: (
                tuple(entry["shape"]),
                entry["dtype"],
                start + entry["data_offsets"][0],
                start + entry["data_offsets"][1],
            )
            for name, entry in sorted(header.items())  # sorted, as the library lists them
            if name != "__metadata__"
        }

    @contextlib.contextmanager
    def _open(self):
        try:
            with safe_open(self.path, framework="numpy") as file:
                yield file
        except SafetensorError as error:
            size = os.path.getsize(self.path)
            raise ValueError(f"`{self.path}` ({size} bytes) is corrupt or truncated: {error}.") from None

    def keys(self):
        return list(self._entries)

    def shape(self, name):
        return self._entries[name][0]

    def nbytes(self, name):
        _, _, start, stop = self._entries[name]
        return stop - start

    def read(self, name):
        """The tensor `name` as a read-only NumPy array viewing the file (bfloat16 via `ml_dtypes`).

        The tensor's pages are mapped for this array alone and unmapped when
        it is freed (`utils.loading.mapped_array`).
        """
        mapped = self._mapped(name, whole=True)
        if mapped is not None:
            return mapped
        with self._open() as file:
            return self._checked(name, lambda: file.get_tensor(name))

    def read_part(self, name, index):
        """The part `index` (a tuple of slices, one per axis) of tensor `name`; only those bytes are read.

        A view of the file where `read` gives one: only the pages holding the part are read in.
        """
        mapped = self._mapped(name, whole=False)
        if mapped is not None:
            return mapped[tuple(index)]
        with self._open() as file:
            return self._checked(name, lambda: file.get_slice(name)[tuple(index)])

    def read_stacked(self, names):
        """Tensors `names` stored back to back in this order, of one shape and dtype, as one array; else `None`.

        The array, `(len(names), *shape)`, views the file as `read` does: a
        fused kernel's tensors (the MLP's gate and up, adjacent in a file
        written in name order) need no copy to be placed side by side.
        """
        entries = [self._entries[name] for name in names]
        shape, dtype, start, _ = entries[0]
        numpy_dtype = _NUMPY_DTYPES.get(dtype)
        if numpy_dtype is None or entries[0][2] == entries[0][3] or any(e[:2] != (shape, dtype) for e in entries):
            return None
        if any(before[3] != after[2] for before, after in zip(entries, entries[1:])):
            return None
        return mapped_array(self.path, start, entries[-1][3], numpy_dtype, (len(names), *shape))

    def advise(self, name):
        """Asks the kernel to start reading tensor `name` into the page cache; returns once the reads are queued.

        Nothing is mapped into this process, so its memory does not grow. Does
        nothing where `posix_fadvise` is missing (not Linux).
        """
        _, _, start, stop = self._entries[name]
        if not hasattr(os, "posix_fadvise") or stop == start:
            return
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, start, stop - start, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)

    def _mapped(self, name, whole):
        """`mapped_array` of tensor `name`, or `None` for a dtype (or an empty tensor) the library reads."""
        shape, dtype, start, stop = self._entries[name]
        numpy_dtype = _NUMPY_DTYPES.get(dtype)
        if numpy_dtype is None or stop == start:
            return None
        return mapped_array(self.path, start, stop, numpy_dtype, shape, whole=whole)

    def _checked(self, name, read):
        try:
            return read()
        except (SafetensorError, TypeError, ValueError) as error:
            raise ValueError(f"`{self.path}`: tensor `{name}` could not be read ({error}).") from None


class HFCheckpoint:
    """A Hugging Face T5Gemma 2 (or T5Gemma) checkpoint: a local folder or an `hf://` handle.

    Files are fetched through KerasHub's `get_file` (which downloads `hf://`
    handles), with clear errors for gated or missing repositories.

    Args:
        preset: local folder path or `hf://org/name`.
        check_config: callable raising a clear error for a config of another model.
    """

    def __init__(self, preset, config=None, check_config=check_t5gemma2_config):
        self.preset = preset
        self.config = config if config is not None else self.json("config.json")
        check_config(self.config)
        self._files = {}
        self._opening = threading.Lock()
        self._weight_map = None

    def path(self, name):
        """Local path of file `name` of the checkpoint (downloading it if needed)."""
        return fetch_file(self.preset, name)

    def has(self, name):
        try:
            self.path(name)
            return True
        except FileNotFoundError:
            return False

    def json(self, name):
        return read_json_file(self.path(name), f"`{self.preset}/{name}`")

    def _index(self):
        if self._weight_map is None:
            if self.has(SAFETENSORS_INDEX):
                self._weight_map = self._checked_weight_map(self.json(SAFETENSORS_INDEX))
            elif self.has(SAFETENSORS_FILE):
                self._weight_map = {key: SAFETENSORS_FILE for key in self._file(SAFETENSORS_FILE).keys()}
            else:
                raise FileNotFoundError(
                    f"`{self.preset}` has neither `{SAFETENSORS_FILE}` nor `{SAFETENSORS_INDEX}`; "
                    "only safetensors checkpoints are supported."
                )
        return self._weight_map

    def _checked_weight_map(self, index):
        """The index's `weight_map`, refusing shard names that leave the checkpoint folder."""
        weight_map = index.get("weight_map")
        where = f"`{self.preset}/{SAFETENSORS_INDEX}`"
        if not isinstance(weight_map, dict):
            raise ValueError(f"{where} has no `weight_map` object.")
        for key, name in weight_map.items():
            normalized = os.path.normpath(name) if isinstance(name, str) else ""
            if (
                not normalized
                or os.path.isabs(name)
                or normalized.split(os.sep)[0] in ("..", "")
                or "\\" in name
                or ":" in name
            ):
                raise ValueError(
                    f"{where} maps `{key}` to {name!r}, which is not a file inside the checkpoint folder; "
                    "refusing to read it."
                )
        return weight_map

    def _file(self, name):
        with self._opening:  # `ReadAhead`'s thread may open a file first
            if name not in self._files:
                self._files[name] = SafetensorsFile(self.path(name))
            return self._files[name]

    def keys(self):
        return list(self._index())

    def read(self, key):
        return self._file(self._index()[key]).read(key)

    def read_part(self, key, index):
        """The part `index` (a tuple of slices) of tensor `key`."""
        return self._file(self._index()[key]).read_part(key, index)

    def read_stacked(self, keys):
        """`SafetensorsFile.read_stacked` of tensors `keys`; `None` when they are not back to back in one file."""
        files = {self._index()[key] for key in keys}
        if len(files) != 1:
            return None
        return self._file(files.pop()).read_stacked(keys)

    def advise(self, key):
        """`SafetensorsFile.advise`: the kernel starts reading tensor `key` into the page cache."""
        self._file(self._index()[key]).advise(key)

    def shape(self, key):
        return self._file(self._index()[key]).shape(key)

    def nbytes(self, key):
        return self._file(self._index()[key]).nbytes(key)


class ReadAhead:
    """Fetches the tensors a load reads next from the disk while it converts the one in hand.

    A load reads one tensor, then copies it into the model (transposing
    torch's `[out, in]` linear weights); read from a disk rather than the page
    cache, the two took turns. `plan(keys)` gives the order of the reads;
    each `passed(key)` then asks the kernel (`advise(key)`, in one background
    thread, since a large request waits for the disk's queue) to read the
    tensors after `key`, up to `ahead_bytes` beyond it (at least one), into
    the page cache. Only the page cache grows, not this process.

    Example:
    >>> with ReadAhead(checkpoint) as ahead:  # doctest: +SKIP
    ...     ahead.plan(keys)
    ...     for key in keys:
    ...         ahead.passed(key)
    ...         convert(checkpoint.read(key))
    """

    def __init__(self, checkpoint, ahead_bytes=512 << 20):
        self.checkpoint = checkpoint
        self.ahead_bytes = ahead_bytes
        self._order, self._position, self._next = [], {}, 0
        self._worker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None

    def plan(self, keys):
        """`keys` will be read in this order (each whole)."""
        self._order = list(keys)
        self._position = {key: index for index, key in enumerate(self._order)}
        self._next = 0

    def passed(self, key):
        """`key` is being read: asks for the planned tensors after it, up to `ahead_bytes`."""
        index = self._position.get(key)
        if index is None:
            return
        self._next = max(self._next, index + 1)
        ahead = sum(self.checkpoint.nbytes(k) for k in self._order[index + 1 : self._next])
        while self._next < len(self._order) and (self._next == index + 1 or ahead < self.ahead_bytes):
            upcoming = self._order[self._next]
            ahead += self.checkpoint.nbytes(upcoming)
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
            self._worker.submit(self.checkpoint.advise, upcoming)
            self._next += 1
