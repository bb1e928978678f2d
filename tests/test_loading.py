"""Loading fills each variable once from the checkpoint: no initializer runs, a sharded load reads only parts.

Every loader (Hugging Face folders, Keras preset folders old and new,
KerasHub's own presets, straight into int8) is run while each Keras
variable's initializer is recorded; none of the model's may run, and the
values must be the checkpoint's, in the dtype asked for. The sharded load runs
in a child process with 8 virtual CPU devices (as in `test_distribution.py`):
on a (2, 4) mesh with the layout map, each variable laid out over devices (of a
T5Gemma 2 and of a first-generation T5Gemma checkpoint) is filled from parts
of its checkpoint tensor, never the whole one.
"""

import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import keras
import numpy as np
import pytest
from hf_checkpoints import checkpoint_config
from hf_checkpoints import write_checkpoint

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma.conversion.checkpoint import HFCheckpoint
from keras_t5gemma.conversion.checkpoint import ReadAhead
from keras_t5gemma.conversion.checkpoint import SafetensorsFile
from keras_t5gemma.conversion.weights import weight_specs
from keras_t5gemma.utils.loading import LoadProgress

CHILD = "T5GEMMA2_LOADING_CHILD"
IN_CHILD = os.environ.get(CHILD) == "1"
FOLDER = "T5GEMMA2_LOADING_FOLDER"


@contextlib.contextmanager
def initializers_run():
    """The ids of the variables whose initializer runs inside the block.

    Also those read while still empty, which gives the initializer's values
    (Keras' placeholder for tracing) instead of the checkpoint's.
    """
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    ran = []
    original = keras.Variable._initialize_with_initializer
    original = getattr(original, "original", original)
    value = keras.Variable.value

    def recording(variable, initializer):
        ran.append(id(variable))
        return original(variable, initializer)

    def recording_value(variable):
        if variable._value is None and not in_stateless_scope():
            ran.append(id(variable))
        return value.fget(variable)

    with (
        mock.patch.object(keras.Variable, "_initialize_with_initializer", recording),
        mock.patch.object(keras.Variable, "value", property(recording_value)),
    ):
        yield ran


def _loaded(load):
    with initializers_run() as ran:
        model = load()
    ran = set(ran)
    return model, [variable.path for variable in model.variables if id(variable) in ran]


@pytest.fixture(scope="module")
def hf_folder(small_proto, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_checkpoint")
    write_checkpoint(folder, checkpoint_config(), small_proto, seed=7)
    return str(folder)


def _assert_holds_the_checkpoint(backbone, folder, dtype):
    checkpoint = HFCheckpoint(folder)
    for spec in weight_specs(backbone):
        assert keras.backend.standardize_dtype(spec.variable.dtype) == dtype, spec.variable.path
        held = spec.value()
        np.testing.assert_array_equal(
            held, spec.convert(checkpoint.read(spec.key)).astype(held.dtype), err_msg=spec.key
        )


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_hugging_face_load_runs_no_initializer(hf_folder, dtype):
    backbone, initialized = _loaded(lambda: T5Gemma2Backbone.from_preset(hf_folder, dtype=dtype))
    assert initialized == []
    _assert_holds_the_checkpoint(backbone, hf_folder, dtype)
    assert _holding_pages_of(backbone, hf_folder) == []


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_a_quantized_load_runs_none_of_the_models_initializers(hf_folder):
    backbone, initialized = _loaded(lambda: T5Gemma2Backbone.from_preset(hf_folder, quantize="int8", text_only=True))
    assert initialized == []
    kernel = backbone.encoder.transformer_layers[0].attention.query_key_value_dense._kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
@pytest.mark.parametrize("max_shard_size", [None, 0.0001])
def test_our_preset_reloads_without_initializers(hf_folder, tmp_path, max_shard_size):
    """`save_to_preset` in one file or in Keras' shards (0.0001 GB each) reloads with no initializer run."""
    saved = T5Gemma2Seq2SeqLM.from_preset(hf_folder, dtype="bfloat16")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    saved.save_to_preset(str(tmp_path / "preset"), **kwargs)
    if max_shard_size is not None:
        assert len(list((tmp_path / "preset").glob("model_*.weights.h5"))) > 1
    seq_2_seq_lm, initialized = _loaded(
        lambda: T5Gemma2Seq2SeqLM.from_preset(str(tmp_path / "preset"), dtype="bfloat16")
    )
    assert initialized == []
    for ours, theirs in zip(seq_2_seq_lm.backbone.weights, saved.backbone.weights, strict=True):
        assert keras.backend.standardize_dtype(ours.dtype) == "bfloat16"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_the_bundled_preset_written_before_loads_without_initializers():
    """`model.weights.h5` saved before this loader; values as Keras' own `load_weights` gives them.

    Each value is read as a view of the file's pages (no copy before the one into the model).
    """
    from keras_t5gemma.utils import loading

    fill, kinds = loading.fill, []

    def recording_fill(variable, read, read_part=None):
        kinds.append(type(_buffer_owner(read())).__name__)
        return fill(variable, read, read_part)

    with mock.patch.object(loading, "fill", recording_fill):
        backbone, initialized = _loaded(lambda: T5Gemma2Backbone.from_preset("t5gemma2_tiny_digits"))
    assert initialized == []
    assert len(kinds) == len(backbone.weights) and set(kinds) == {"mmap"}, sorted(set(kinds))
    reference = T5Gemma2Backbone.from_config(backbone.get_config())
    reference.load_weights(str(_bundled_weights()))
    for ours, theirs in zip(backbone.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def _holding_pages_of(model, folder):
    """The paths of `model`'s variables whose memory (any device's shard) is mapped from a file under `folder`."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 5 and fields[5].startswith(str(folder)):
                start, stop = (int(address, 16) for address in fields[0].split("-"))
                spans.append((start, stop))
    return [
        variable.path
        for variable in model.weights
        for shard in variable.value.addressable_shards
        if any(start <= shard.data.unsafe_buffer_pointer() < stop for start, stop in spans)
    ]


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_a_loaded_model_holds_no_page_of_its_files_and_survives_their_rewriting(tmp_path):
    """Each value is copied out of the mapped file, even where JAX could keep the file's (aligned) memory.

    A model holding the file's pages changed with the file, and died of
    SIGBUS when Keras' `save_weights` truncated it in place to write it anew.
    """
    import shutil

    folder = tmp_path / "preset"
    shutil.copytree(_bundled_weights().parent, folder)
    backbone = T5Gemma2Backbone.from_preset(str(folder))
    assert _holding_pages_of(backbone, folder) == []
    values = [keras.ops.convert_to_numpy(variable).copy() for variable in backbone.weights]
    backbone.save_weights(str(folder / "model.weights.h5"))  # truncates the file first
    for variable, value in zip(backbone.weights, values, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value, err_msg=variable.path)


def _buffer_owner(array):
    """The object whose memory `array` views (itself when it owns its data)."""
    while isinstance(array, (np.ndarray, memoryview)):
        base = array.obj if isinstance(array, memoryview) else array.base
        if base is None:
            return array
        array = base
    return array


def _bundled_weights():
    from keras_t5gemma.utils.preset_utils import resolve_preset

    return Path(resolve_preset("t5gemma2_tiny_digits")) / "model.weights.h5"


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_each_tensor_is_asked_of_the_disk_before_it_is_read(hf_folder):
    """A load asks the kernel for every tensor after the first before reading it, in the order it reads them."""
    advised, reads, stacked = [], [], []
    ready = threading.Condition()
    advise, read, read_stacked = SafetensorsFile.advise, SafetensorsFile.read, SafetensorsFile.read_stacked

    def recording_advise(self, name):
        advise(self, name)
        with ready:
            advised.append(name)
            ready.notify_all()

    def waited_for(name):
        if reads:  # each read waits (a while at most) for its tensor's read-ahead, so that none is outrun
            with ready:
                ready.wait_for(lambda: name in advised, timeout=10)
        reads.append(name)

    def waiting_read(self, name):
        waited_for(name)
        return read(self, name)

    def waiting_read_stacked(self, names):
        for name in names:
            waited_for(name)
        stacked.append(names)
        return read_stacked(self, names)

    with (
        mock.patch.object(SafetensorsFile, "advise", recording_advise),
        mock.patch.object(SafetensorsFile, "read", waiting_read),
        mock.patch.object(SafetensorsFile, "read_stacked", waiting_read_stacked),
    ):
        backbone = T5Gemma2Backbone.from_preset(hf_folder, dtype="bfloat16")
    assert len(reads) == len({spec.key for spec in weight_specs(backbone)})
    assert advised == reads[1:]
    # Each layer's gate and up projections, written next to each other, are read as one array.
    layers = len(backbone.encoder.transformer_layers) + len(backbone.decoder.transformer_layers)
    assert len(stacked) == layers and all(names[0].endswith("gate_proj.weight") for names in stacked)


def test_read_ahead_stays_within_its_bytes_and_goes_at_least_one_tensor_ahead():
    class Checkpoint:
        sizes = {"a": 10, "b": 10, "c": 30, "d": 10, "e": 10}

        def __init__(self):
            self.advised, self.ready = [], threading.Condition()

        def nbytes(self, key):
            return self.sizes[key]

        def advise(self, key):
            with self.ready:
                self.advised.append(key)
                self.ready.notify_all()

        def wait_for(self, count):
            with self.ready:
                assert self.ready.wait_for(lambda: len(self.advised) >= count, timeout=10), self.advised
            return list(self.advised)

    checkpoint = Checkpoint()
    with ReadAhead(checkpoint, ahead_bytes=15) as ahead:
        ahead.plan(["a", "b", "c", "d", "e"])
        ahead.passed("unplanned")
        ahead.passed("a")  # b (10 bytes) and c, which crosses the 15
        assert checkpoint.wait_for(2) == ["b", "c"]
        ahead.passed("b")  # c (30) is already ahead: nothing more
        ahead.passed("c")  # d, then e, which crosses the 15
        assert checkpoint.wait_for(4) == ["b", "c", "d", "e"]
        ahead.passed("e")
    assert checkpoint.advised == ["b", "c", "d", "e"]


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_the_progress_bar_shows_bytes_per_second_and_a_closing_line(hf_folder, capsys):
    T5Gemma2Backbone.from_preset(hf_folder, text_only=True)
    assert capsys.readouterr().err == ""  # off under pytest by default
    T5Gemma2Backbone.from_preset(hf_folder, text_only=True, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"\] [\d.]+ [KMG]?B / [\d.]+ [KMG]?B [\d.]+ [KMG]?B/s", err), err
    assert re.search(r"Loaded `.*` in [\d.]+ s \(.*/s\); its weights hold [\d.]+ [KMG]?B\. *\n$", err), err
    steps = []
    backbone = T5Gemma2Backbone.from_preset(hf_folder, text_only=True, progress=steps.append)
    assert capsys.readouterr().err == ""
    assert steps == [1] * len(list(weight_specs(backbone)))  # once per tensor read


def test_load_progress_counts_bytes():
    stream = _Stream()
    bar = LoadProgress(3_000_000, "x", progress=True, stream=stream)
    bar.advance(3_000_000)
    bar.done(model_bytes=3_000_000)
    assert "3.00 MB / 3.00 MB" in stream.text and stream.text.rstrip().endswith("its weights hold 3.00 MB.")


def test_quiet_silences_the_default_bar_in_a_terminal(monkeypatch):
    from keras_t5gemma.cli import build_parser
    from keras_t5gemma.cli import main
    from keras_t5gemma.utils.loading import QUIET_VARIABLE
    from keras_t5gemma.utils.loading import progress_wanted

    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setenv(QUIET_VARIABLE, "0")  # restored (unset) after the test, though `main` sets it
    monkeypatch.setattr("sys.stderr", mock.Mock(isatty=lambda: True))
    assert progress_wanted(None)
    assert main(["presets", "--quiet"]) == 0
    assert not progress_wanted(None) and progress_wanted(True)  # an explicit choice still wins
    # Every subcommand takes --quiet (fine-tune and evaluate with their own, which silence more).
    parser = build_parser()
    commands = {"generate": ["x"], "embed": ["x"], "classify": ["x"], "serve": [], "fine-tune": ["x"]}
    commands.update(evaluate=["x"], convert=["x", "y"], export=["x", "--format", "onnx"])
    for name, arguments in commands.items():
        assert parser.parse_args([name, *arguments, "--quiet"]).quiet, name


class _Stream:
    text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.skipif(IN_CHILD, reason="this is the child process")
def test_a_sharded_load_reads_only_each_devices_part(small_proto, tmp_path):
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("JAX distribution only")
    # A vocabulary the model axis (4) and the data axis (2) divide.
    write_checkpoint(tmp_path / "t5gemma2", checkpoint_config(text={"vocab_size": 336}), small_proto, seed=3)
    _write_first_family_checkpoint(tmp_path / "t5gemma")
    flags = ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
    environment = {
        **os.environ,
        CHILD: "1",
        FOLDER: str(tmp_path),
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": " ".join(flags),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "in_the_child"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"\b2 passed", result.stdout), result.stdout[-2000:]


def _write_first_family_checkpoint(folder):
    """A tiny random T5Gemma (first generation) checkpoint whose split sizes a (2, 4) mesh divides."""
    import torch
    from transformers import T5GemmaConfig
    from transformers import T5GemmaForConditionalGeneration

    encoder = {
        "vocab_size": 336,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "sliding_window": 3,
        "query_pre_attn_scalar": 8,
    }
    decoder = {**encoder, "hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "head_dim": 12}
    torch.manual_seed(5)
    model = T5GemmaForConditionalGeneration(T5GemmaConfig(encoder=encoder, decoder=decoder))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            # Norm scales random too, so that a misplaced part shows.
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)


@pytest.mark.skipif(not IN_CHILD, reason="runs in the 8-device child process")
@pytest.mark.parametrize("family", ["t5gemma2", "t5gemma"])
def test_in_the_child_sharded_parts_only(family):
    from keras_t5gemma.conversion.t5gemma_config import t5gemma_weight_specs
    from keras_t5gemma.models.layout import layout_map
    from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone

    backbone_class, specs_of = {
        "t5gemma2": (T5Gemma2Backbone, weight_specs),
        "t5gemma": (T5GemmaBackbone, t5gemma_weight_specs),
    }[family]
    folder = os.path.join(os.environ[FOLDER], family)
    unsharded = backbone_class.from_preset(folder, dtype="bfloat16")
    expected = {v.path: keras.ops.convert_to_numpy(v) for v in unsharded.weights}
    del unsharded
    whole, parts, advised = [], {}, []
    read, read_part = SafetensorsFile.read, SafetensorsFile.read_part

    def recording_read(self, name):
        whole.append(name)
        return read(self, name)

    def recording_read_part(self, name, index):
        array = read_part(self, name, index)
        parts.setdefault(name, []).append(array.size)
        return array

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), keras.distribution.list_devices())
    distribution = keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")
    with (
        distribution.scope(),
        mock.patch.object(SafetensorsFile, "read", recording_read),
        mock.patch.object(SafetensorsFile, "read_part", recording_read_part),
        mock.patch.object(SafetensorsFile, "advise", lambda self, name: advised.append(name)),
        initializers_run() as ran,
    ):
        backbone = backbone_class.from_preset(folder, dtype="bfloat16")
    assert not {id(v) for v in backbone.variables} & set(ran)
    assert _holding_pages_of(backbone, folder) == []
    assert whole == [], f"whole tensors read: {whole[:5]}"
    assert advised == [], f"whole tensors asked of the disk ahead: {advised[:5]}"
    split = 0
    for spec in specs_of(backbone):
        variable = spec.variable
        sharding = variable.value.sharding
        assert sharding.spec == variable._layout.backend_layout.spec, variable.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected[variable.path])
        if any(axis is not None for axis in sharding.spec):
            split += 1
            size = int(np.prod(variable.shape))
            # Of a fused kernel's tensors too (the MLP's gate and up), only parts of each.
            assert max(parts[spec.key]) < np.prod(spec.shape), (
                f"{spec.key}: a part as large as the whole tensor was read"
            )
            # One read per distinct part: a device's shard, or the replicas' shared one.
            for shard in variable.value.addressable_shards:
                assert shard.data.size < size
    assert split >= 10, split


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_an_assign_to_an_empty_variable_fills_it_and_a_wrong_shape_is_refused():
    from keras_t5gemma.utils.loading import built_without_values
    from keras_t5gemma.utils.loading import fills_on_assign
    from keras_t5gemma.utils.loading import is_unfilled

    def build():
        layer = keras.layers.Dense(3, dtype="bfloat16")
        layer.build((None, 4))
        return layer

    with initializers_run() as ran:
        layer = built_without_values(build)
        kernel = np.arange(12, dtype="float32").reshape(4, 3)
        with fills_on_assign():
            layer.kernel.assign(kernel)
            with pytest.raises(ValueError, match="shape"):
                layer.bias.assign(np.zeros((4,), "float32"))
    assert ran == []
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel).astype("float32"), kernel)
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "bfloat16"
    assert is_unfilled(layer.bias)


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_a_tensor_is_read_as_a_view_of_the_file_and_unmapped_when_freed(tmp_path):
    import gc
    import mmap

    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = str(tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    tensors = {
        "bfloat16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "float32": rng.standard_normal((7,)).astype("float32"),
        "float16": rng.standard_normal((2, 2, 3)).astype("float16"),
        "int64": np.arange(5, dtype="int64"),
        "empty": np.zeros((0, 4), "float32"),
        "uint32": np.arange(4, dtype="uint32"),  # read by the library
    }
    save_file(tensors, path)
    checkpoint = SafetensorsFile(path)
    with safe_open(path, framework="numpy") as file:
        for name in tensors:
            array = checkpoint.read(name)
            expected = file.get_tensor(name)
            assert array.dtype == expected.dtype and array.shape == expected.shape, name
            np.testing.assert_array_equal(array.astype("float32"), expected.astype("float32"), err_msg=name)
            if expected.ndim and expected.shape[0] > 1:
                index = (slice(1, expected.shape[0]),) + (slice(None),) * (expected.ndim - 1)
                part = checkpoint.read_part(name, index)
                np.testing.assert_array_equal(part.astype("float32"), expected[index].astype("float32"), err_msg=name)

    def mapped():
        with open("/proc/self/maps") as maps:
            return sum(path in line for line in maps)

    array = checkpoint.read("bfloat16")
    base = _buffer_owner(array)
    assert isinstance(base, mmap.mmap), "the tensor was copied out of the file"
    assert isinstance(_buffer_owner(checkpoint.read_part("bfloat16", (slice(0, 1), slice(1, 3)))), mmap.mmap)
    assert not array.flags.writeable
    assert mapped() == 1
    del array, base
    gc.collect()
    assert mapped() == 0, "the file stays mapped after its tensor is freed"


@pytest.mark.skipif(IN_CHILD, reason="runs in the parent process")
def test_copies_in_parallel_fill_every_variable_on_leaving_and_none_after_an_error():
    from keras_t5gemma.utils.loading import built_without_values
    from keras_t5gemma.utils.loading import copies_in_parallel
    from keras_t5gemma.utils.loading import fill_from_values
    from keras_t5gemma.utils.loading import is_unfilled

    if keras.backend.backend() != "jax":
        pytest.skip("the copies run in threads on JAX only")

    def build():
        layers = [keras.layers.Dense(3, dtype="bfloat16") for _ in range(5)]
        for layer in layers:
            layer.build((None, 4))
        return layers

    rng = np.random.default_rng(0)
    layers = built_without_values(build)
    values = {id(v): rng.standard_normal(v.shape).astype("float32") for layer in layers for v in layer.weights}
    with copies_in_parallel(ahead_bytes=1):
        for layer in layers:
            for variable in layer.weights:
                fill_from_values(variable, values[id(variable)].T.T)  # a view, as a transposed tensor is
    for layer in layers:
        for variable in layer.weights:
            assert keras.backend.standardize_dtype(variable.dtype) == "bfloat16"
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable).astype("float32"),
                values[id(variable)].astype(keras.ops.convert_to_numpy(variable).dtype).astype("float32"),
            )
    layers = built_without_values(build)
    with pytest.raises(RuntimeError, match="stopped"), copies_in_parallel():
        fill_from_values(layers[0].kernel, np.ones((4, 3), "float32"))
        raise RuntimeError("stopped")
    assert all(is_unfilled(variable) for layer in layers for variable in layer.weights)
