"""Reading Hugging Face T5Gemma 2 checkpoints: files, config and tensors.

Tensors are read one at a time, each straight into its own array, so
converting a model needs little memory beyond the model itself (a memory map
would instead keep every page read resident in the process).
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from keras_t5gemma.conversion.config import check_t5gemma2_config
from keras_t5gemma.utils.hub import fetch_file
from keras_t5gemma.utils.hub import read_json_file

_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# Allocations above this size get their own memory mapping (see below).
_MMAP_THRESHOLD = 1 << 20
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def return_freed_memory_to_the_system():
    """Makes glibc give large freed buffers back to the system at once.

    Loading a checkpoint replaces every randomly initialised weight, one
    tensor at a time. glibc serves allocations above a threshold with their
    own memory mappings, but raises that threshold each time such a buffer is
    freed, so later tensors land on its heap, whose freed space it keeps:
    converting the 270m-270m model then peaked at 3.1x its weights. A fixed
    threshold keeps the peak near one copy of the model. Elsewhere than glibc
    this does nothing.
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
    """A `.safetensors` file, read one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header mapping
    names to dtype, shape and byte offsets, then the raw data.

    Example:
    >>> checkpoint = SafetensorsFile("model.safetensors")  # doctest: +SKIP
    >>> checkpoint.read("model.encoder.norm.weight").shape  # doctest: +SKIP
    (640,)
    """

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ValueError(f"`{path}` is not a safetensors file: it is only {size} bytes long.")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                raise ValueError(f"`{path}` is corrupt or truncated: its header claims {header_length} bytes.")
            try:
                header = json.loads(file.read(header_length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"`{path}` is corrupt: its header is not valid JSON ({error}).") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_length
        self._entries = header
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise ValueError(f"`{path}`: tensor `{name}` has unsupported dtype {entry.get('dtype')!r}.")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"])) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
            if end - begin != expected or self._data_start + end > size:
                raise ValueError(
                    f"`{path}` is corrupt or truncated: tensor `{name}` needs bytes {begin}-{end} "
                    f"({expected} expected) of a {size - self._data_start}-byte data section."
                )

    def keys(self):
        return list(self._entries)

    def read(self, name):
        """The tensor `name` as a NumPy array (bfloat16 via `ml_dtypes`)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        array = np.empty(entry["shape"], _DTYPES[entry["dtype"]])
        with open(self.path, "rb") as file:
            file.seek(self._data_start + begin)
            if file.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                raise ValueError(f"`{self.path}` is truncated: tensor `{name}` could not be read whole.")
        return array


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
        if name not in self._files:
            self._files[name] = SafetensorsFile(self.path(name))
        return self._files[name]

    def keys(self):
        return list(self._index())

    def read(self, key):
        return self._file(self._index()[key]).read(key)
