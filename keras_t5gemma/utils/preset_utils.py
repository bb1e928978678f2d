"""Named presets, preset loaders and `from_preset`, written once for every model family.

A model family registers its presets (plain data, e.g.
`models/t5gemma2/t5gemma2_presets.py`) with `register_presets`, and its Hugging Face
checkpoint converter with `register_checkpoint_loader`; classes get
`presets` and `from_preset` from `PresetMixin`. Models import this module,
never the converters: a converter registers itself when
`keras_t5gemma.conversion` is imported (the package's `__init__` does).

A preset is one of:
- a registered name (a hub handle, or a folder bundled with the package
  under `keras_t5gemma/presets/`, written `bundled://NAME`);
- a Keras preset folder written by `save_to_preset` (loaded by KerasHub),
  or one written by another library's model of a registered
  `registered_name` (KerasHub's own T5Gemma 2, converted on load); local or
  a `kaggle://` handle;
- a Hugging Face checkpoint of a registered `model_type`: an `hf://org/name`
  handle or a local folder with `config.json` and safetensors weights.
"""

import contextvars
import math
import os
import re
from pathlib import Path

from keras_hub.layers import ImageConverter
from keras_hub.models import Backbone
from keras_hub.models import Preprocessor
from keras_hub.models import Task
from keras_hub.tokenizers import Tokenizer

from keras_t5gemma.utils.hub import fetch_file
from keras_t5gemma.utils.hub import read_json_file
from keras_t5gemma.utils.keras_hub_compat import KerasPresetLoader
from keras_t5gemma.utils.keras_hub_compat import classproperty
from keras_t5gemma.utils.loading import built_without_values
from keras_t5gemma.utils.loading import fills_on_assign
from keras_t5gemma.utils.loading import initialize_unfilled
from keras_t5gemma.utils.safe_files import atomic_folder

BUNDLED_DIRECTORY = Path(__file__).resolve().parents[1] / "presets"
BUNDLED_SCHEME = "bundled://"

# {name: metadata}: `handle`, `description`, `params`.
_PRESETS = {}
# {class: {name: metadata}}, for the `presets` property.
_CLASS_PRESETS = {}
# {Hugging Face `model_type`: PresetLoader subclass}.
_CHECKPOINT_LOADERS = {}
# {Keras `registered_name` of another library's backbone: PresetLoader subclass}.
_FOREIGN_PRESET_LOADERS = {}
# {export format: callable(model, path, **options)}.
_EXPORTERS = {}
# What `save_to_preset` writes in a preset folder (KerasHub's files, sharded
# weights, and `DESCRIPTION`, the first line of which the registry shows).
_PRESET_ENTRIES = re.compile(
    r"^(config|task|preprocessor|tokenizer|image_converter|audio_converter|video_converter|metadata"
    r"|model\.weights)\.json$|^(model|task)(_\d+)?\.weights\.h5$|^assets$|^DESCRIPTION$"
)
# The `quantize` modes `from_preset` accepts.
QUANTIZE_MODES = ("int8", "int4")
# Set while a `save_to_preset` writes its temporary folder (parts save into it too).
_SAVING_INTO = contextvars.ContextVar("saving_into", default=None)


def is_preset_entry(name):
    """Whether `name` is a file or folder that `save_to_preset` writes in a preset folder."""
    return bool(_PRESET_ENTRIES.match(name))


def register_presets(presets, classes):
    """Makes `presets` (`{name: metadata}`) loadable by name and lists them on `classes`.

    Each metadata dict has a `handle` (`hf://...`, `kaggle://...`, a folder
    or `bundled://NAME`) and a one-line `description`.
    """
    for name, metadata in presets.items():
        if "handle" not in metadata or "description" not in metadata:
            raise ValueError(f"Preset `{name}` needs a `handle` and a `description`; got {sorted(metadata)}.")
        _PRESETS[name] = dict(metadata)
    for cls in classes:
        _CLASS_PRESETS.setdefault(cls, {}).update(presets)


def registered_presets():
    """`{name: metadata}` of every registered preset, in registration order."""
    return {name: dict(metadata) for name, metadata in _PRESETS.items()}


def presets_for(cls):
    """`{name: metadata}` registered for `cls` or its nearest registered base class."""
    for klass in cls.__mro__:
        if klass in _CLASS_PRESETS:
            return {name: dict(metadata) for name, metadata in _CLASS_PRESETS[klass].items()}
    return {}


def is_bundled(metadata):
    """Whether a preset ships inside the package (no download)."""
    return metadata["handle"].startswith(BUNDLED_SCHEME)


def resolve_preset(preset):
    """Maps a preset name to its handle or folder; other presets pass through.

    Raises:
        ValueError: for a name that is neither a known preset, a handle nor
            an existing folder, listing the known names.
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise ValueError(f"A preset must be a name, a folder or a handle; got {type(preset).__name__}.")
    preset = os.fspath(preset)
    if preset in _PRESETS:
        preset = _PRESETS[preset]["handle"]
        if preset.startswith(BUNDLED_SCHEME):
            return str(BUNDLED_DIRECTORY / preset[len(BUNDLED_SCHEME) :])
        return preset
    if "://" in preset or os.path.exists(preset):
        return preset
    raise ValueError(
        f"Unknown preset `{preset}`: not a known name, an `hf://` handle or an existing folder. "
        f"Known presets: {', '.join(_PRESETS)}."
    )


def check_quantize_mode(mode):
    """Raises a `ValueError` naming the accepted modes unless `mode` is one of `QUANTIZE_MODES`."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; `quantize` accepts {', '.join(QUANTIZE_MODES)}.")


def register_checkpoint_loader(model_type, loader_cls):
    """Loads Hugging Face checkpoints whose `config.json` says `model_type` with `loader_cls(preset, config)`."""
    _CHECKPOINT_LOADERS[model_type] = loader_cls


def register_foreign_preset_loader(registered_name, loader_cls):
    """Loads Keras preset folders whose backbone is `registered_name` (another library's) with `loader_cls`."""
    _FOREIGN_PRESET_LOADERS[registered_name] = loader_cls


def register_exporter(export_format, exporter):
    """Makes `exporter(model, path, **options)` the `export_format` export of every model class.

    Models reach exporters through `get_exporter`, so that they never import
    the converters that register them.
    """
    _EXPORTERS[export_format] = exporter


def get_exporter(export_format):
    """The exporter registered for `export_format`."""
    if export_format not in _EXPORTERS:
        raise ValueError(f"No exporter for format {export_format!r}; registered: {sorted(_EXPORTERS)}.")
    return _EXPORTERS[export_format]


def get_preset_loader(preset):
    """The loader for `preset` (see the module docstring)."""
    preset = resolve_preset(preset)
    config = read_json_file(fetch_file(preset, "config.json"), f"`{preset}/config.json`")
    if config.get("registered_name") in _FOREIGN_PRESET_LOADERS:
        return _FOREIGN_PRESET_LOADERS[config["registered_name"]](preset, config)
    if "registered_name" in config:
        _check_saved_classes(preset)
        return KerasPresetFolderLoader(preset, config)
    if "model_type" in config:
        model_type = config["model_type"]
        if model_type not in _CHECKPOINT_LOADERS:
            raise ValueError(
                f"`{preset}` is a Hugging Face checkpoint of `model_type` {model_type!r}; "
                f"keras_t5gemma converts {sorted(_CHECKPOINT_LOADERS)}."
            )
        return _CHECKPOINT_LOADERS[model_type](preset, config)
    raise ValueError(f"`{preset}/config.json` is neither a Keras preset config nor a Hugging Face model config.")


# The files of a Keras preset folder that name a class to build.
_CLASS_FILES = ("config.json", "task.json", "preprocessor.json", "tokenizer.json", "image_converter.json")


def _check_saved_classes(preset):
    """Every class a local Keras preset folder names is registered with Keras.

    Raises:
        ValueError: naming the file and the unknown class, or a file that is
            not a JSON object.
    """
    if not os.path.isdir(preset):
        return
    import keras

    _check_weights_files(preset)
    for name in _CLASS_FILES:
        path = os.path.join(preset, name)
        if not os.path.isfile(path):
            continue
        registered_name = read_json_file(path).get("registered_name")
        if registered_name is not None and keras.saving.get_registered_object(registered_name) is None:
            raise ValueError(
                f"`{path}` names the class `{registered_name}`, which is not registered with Keras: the "
                "preset was saved by another package (import it first), or the file is damaged."
            )


_WEIGHTS_FILE = re.compile(r"^(model|task)(_\d+)?\.weights\.h5$")


def _check_weights_files(preset):
    """Checks each weights file of a local Keras preset folder against the length its HDF5 header records.

    A copy or download cut short is then named here, rather than failing
    inside HDF5 with a message that does not name the file.

    Raises:
        ValueError: naming the file, its length and the length it should have.
    """
    for name in sorted(os.listdir(preset)):
        if not _WEIGHTS_FILE.match(name):
            continue
        path = os.path.join(preset, name)
        size = os.path.getsize(path)
        expected = _hdf5_recorded_length(path)
        if expected is None or size < expected:
            found = "no HDF5 header" if expected is None else f"{size:,} bytes of the {expected:,} it records"
            raise ValueError(
                f"`{path}` is damaged or incomplete (a truncated copy or download?): {found}. "
                "Copy or save the preset again."
            )


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _hdf5_recorded_length(path):
    """The end-of-file address an HDF5 superblock records (plus its base address), or None without one."""
    with open(path, "rb") as file:
        for offset in (0, 512, 1024, 2048):  # where HDF5 looks for its superblock in a file
            file.seek(offset)
            header = file.read(64)
            if header[:8] != _HDF5_SIGNATURE or len(header) < 16:
                continue
            version = header[8]
            if version in (0, 1):
                offsets_size = header[13]
                fields = 24 + (4 if version == 1 else 0)  # base, free-space, end-of-file addresses follow
                names = ("base", "free_space", "end")
            else:
                offsets_size = header[9]
                fields = 12
                names = ("base", "extension", "end")
            values = {}
            for index, field in enumerate(names):
                start = fields + index * offsets_size
                values[field] = int.from_bytes(header[start : start + offsets_size], "little")
            return values["base"] + values["end"]
    return None


# The `from_preset` options that shape the backbone, declared once. `PresetMixin.from_preset`
# takes them out of a backbone's or task's arguments, and every loader's `get_backbone_kwargs`
# hands them to its `load_backbone` (through `RoutedOptionsLoader`):
# - `dtype`: the weights' and computations' dtype policy;
# - `quantize`: `"int8"` or `"int4"`, the model of `model.quantize(mode)` (loaders that can build the
#   quantized layers directly do; `from_preset` quantizes what is left float afterwards);
# - `text_only`: no vision tower (its weights are not read);
# - `encoder_only`: no decoder (its weights are not read);
# - `remat`: rematerialise each transformer layer in the backward pass;
# - `progress`: the loading bar (bytes, bytes/s, then one line with the time and the weights' memory):
#   `None` shows it in a terminal or a notebook (not under pytest), `True`/`False` force it, a callable
#   is advanced once per tensor read instead (`utils/loading.py`).
BACKBONE_OPTIONS = ("dtype", "quantize", "text_only", "encoder_only", "remat", "progress")


class RoutedOptionsLoader:
    """Base of every loader of this package: `BACKBONE_OPTIONS` go to `load_backbone`.

    KerasHub's `load_task` builds the backbone with the arguments that
    `get_backbone_kwargs` picks out of `from_preset`'s; here those are
    every backbone option. A loader's `load_backbone` takes them all as
    keyword arguments (`dtype`, `quantize`, `text_only`, `encoder_only`,
    `remat`, `progress`). A `text_only` task gets a preprocessor without an
    image converter.
    """

    def get_backbone_kwargs(self, **kwargs):
        backbone_kwargs = {name: kwargs.pop(name) for name in BACKBONE_OPTIONS if name in kwargs}
        return backbone_kwargs, kwargs

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        if kwargs.get("text_only") and "preprocessor" not in kwargs and cls.preprocessor_cls:
            kwargs["preprocessor"] = self.load_preprocessor(cls.preprocessor_cls, image_converter=None)
        return super().load_task(cls, load_weights, load_task_weights, **kwargs)


class KerasPresetFolderLoader(RoutedOptionsLoader, KerasPresetLoader):
    """KerasHub's loader of Keras preset folders (`save_to_preset`), with the backbone options.

    `dtype`, `encoder_only` and `remat` are backbone config entries, so they
    override the saved config (for a saved task too). `quantize` is left to
    `from_preset`, which quantizes the loaded float model. `text_only` is
    refused for a preset with a vision tower: its weights file holds the
    tower.
    """

    _without_values = False

    def get_backbone_kwargs(self, **kwargs):
        options, kwargs = super().get_backbone_kwargs(**kwargs)
        options.pop("quantize", None)
        options.pop("progress", None)
        if options.pop("text_only", False) and self.config["config"].get("vision_encoder") is not None:
            raise ValueError(
                f"`text_only=True` applies to Hugging Face checkpoints and KerasHub presets; the Keras preset "
                f"`{self.preset}` holds a vision tower in its weights file. Load it whole, or convert the "
                "checkpoint it came from with `text_only=True`."
            )
        return options, kwargs

    # Loading with weights builds the model without values (no initializer runs) and Keras'
    # `load_weights` assigns each variable its saved value, one tensor at a time; what the files
    # did not fill (a task's new head) is initialized afterwards.
    def load_backbone(self, cls, load_weights, **kwargs):
        return self._filled(lambda: super(KerasPresetFolderLoader, self).load_backbone(cls, load_weights, **kwargs))

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        load = super().load_task
        return self._filled(lambda: load(cls, load_weights, load_task_weights, **kwargs), load_weights)

    def _filled(self, load, load_weights=True):
        outer, self._without_values = self._without_values, load_weights
        try:
            with fills_on_assign():
                model = load()
        finally:
            self._without_values = outer
        if not outer:
            initialize_unfilled(model)
        return model

    def _load_serialized_object(self, config, **kwargs):
        if not self._without_values:
            return super()._load_serialized_object(config, **kwargs)
        inner = config.get("config", {})
        if isinstance(inner.get("backbone"), dict):
            # A task (`task.json`) compiles when built, which creates variables with values: only its
            # backbone (the backbone options are already in its config) is built without values.
            backbone = self._load_serialized_object(inner["backbone"])
            config = {**config, "config": {**inner, "backbone": backbone}}
            return super()._load_serialized_object(config, **kwargs)
        load = super()._load_serialized_object
        return built_without_values(lambda: load(config, **kwargs))


class PresetMixin:
    """`presets` and `from_preset` for a backbone, task, preprocessor, tokenizer or image converter.

    Put it first among the bases (`class MyBackbone(PresetMixin, Backbone)`)
    so that registered names and Hugging Face checkpoints go through this
    package's loaders rather than KerasHub's. A class with its own loading
    rules overrides `load_preset`.
    """

    @classproperty
    def presets(cls):
        return presets_for(cls)

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """Loads a named preset, a Keras preset folder or a Hugging Face checkpoint.

        `preset` is a name from `cls.presets`, a folder written by
        `save_to_preset`, an `hf://` handle or a local Hugging Face folder.
        The other arguments are those of the KerasHub base class's
        `from_preset`; backbones and tasks also take the backbone options
        (`BACKBONE_OPTIONS`): `dtype`, `quantize`, `text_only` (Hugging Face
        checkpoints and KerasHub presets: no vision tower), `encoder_only`,
        `remat` and `progress`.

        `quantize="int8"` or `"int4"` gives the model of `model.quantize(mode)`,
        weights and arithmetic alike. A Hugging Face checkpoint loads straight
        into it: each float tensor is quantized as it is read and no float copy
        of the model is held (the other weights get `dtype`). Whatever the
        loader left float (a Keras preset folder, a classifier's new head) is
        quantized here, after the load.
        """
        loader = get_preset_loader(preset)
        quantize = kwargs.get("quantize")
        if quantize is not None:
            check_quantize_mode(quantize)
            if not issubclass(cls, (Backbone, Task)):
                raise ValueError(f"`quantize` applies to backbones and tasks, not to `{cls.__name__}`.")
        model = cls.load_preset(loader, *args, **kwargs)
        if quantize is not None:
            model.quantize(quantize)  # only the layers still float
        return model

    def save_to_preset(self, preset_dir, *args, overwrite=False, **kwargs):
        """KerasHub's `save_to_preset`, written atomically and refusing to clobber a folder.

        The preset is written to a temporary folder beside `preset_dir` and
        renamed into place, so an interruption leaves no half-written preset.
        A non-empty `preset_dir` is refused unless `overwrite=True`; then the
        previous preset's files are replaced and none of them is left behind,
        while files the preset format does not hold (a README, notes) are kept.

        The free space is checked first (the weights' bytes and the files
        around them): a disk too full for the preset gives an
        `OSError(ENOSPC)` and nothing is written. Another process writing
        `preset_dir` (a `save_to_preset`, `fine-tune`, `convert` or
        `export`) makes this one refuse at once.

        Raises:
            FileExistsError: `preset_dir` is a file, or a non-empty folder
                without `overwrite=True`.
            FolderInUseError: (a `FileExistsError`) another process is
                writing `preset_dir`.
            OSError: the disk has too little space, or a write failed.
        """
        if _SAVING_INTO.get() is not None:
            return super().save_to_preset(preset_dir, *args, **kwargs)
        # Checked before writing: HDF5 can crash the process when the disk fills during a write.
        needed = _bytes_to_save(self)
        with atomic_folder(os.fspath(preset_dir), is_preset_entry, overwrite, "preset folder", needed) as temporary:
            token = _SAVING_INTO.set(temporary)
            try:
                super().save_to_preset(temporary, *args, **kwargs)
            finally:
                _SAVING_INTO.reset(token)

    @classmethod
    def load_preset(cls, loader, *args, **kwargs):
        """Builds `cls` with `loader`, as the KerasHub base class's `from_preset` would."""
        if issubclass(cls, Task):
            return _load_task(cls, loader, *args, **kwargs)
        if issubclass(cls, Backbone):
            return _load_backbone(cls, loader, *args, **kwargs)
        if issubclass(cls, Preprocessor):
            return _load_preprocessor(cls, loader, *args, **kwargs)
        if issubclass(cls, Tokenizer):
            return _load_tokenizer(cls, loader, *args, **kwargs)
        if issubclass(cls, ImageConverter):
            return loader.load_image_converter(cls, **kwargs)
        raise TypeError(f"`{cls.__name__}` is not a KerasHub backbone, task, preprocessor, tokenizer or converter.")


def _bytes_to_save(saved):
    """About how many bytes `save_to_preset` writes for `saved`: its weights, HDF5's overhead per
    weight, the tokenizer's vocabulary and the JSON files."""
    total = 256 * 1024
    for variable in getattr(saved, "weights", None) or []:
        digits = re.search(r"\d+", str(variable.dtype))
        itemsize = max(1, int(digits.group()) // 8) if digits else 1
        total += math.prod(variable.shape) * itemsize + 4096
    preprocessor = getattr(saved, "preprocessor", None) or saved
    tokenizer = getattr(preprocessor, "tokenizer", None) or saved
    proto = getattr(tokenizer, "proto", None)
    return total + (len(proto) if isinstance(proto, bytes) else 0)


def _load_task(cls, loader, load_weights=True, **kwargs):
    return loader.load_task(cls, load_weights, True, **kwargs)


def _load_backbone(cls, loader, load_weights=True, **kwargs):
    return loader.load_backbone(cls, load_weights, **kwargs)


def _load_preprocessor(cls, loader, config_file="preprocessor.json", **kwargs):
    return loader.load_preprocessor(cls, config_file, **kwargs)


def _load_tokenizer(cls, loader, config_file="tokenizer.json", **kwargs):
    return loader.load_tokenizer(cls, config_file, **kwargs)
