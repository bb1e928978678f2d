"""Named presets, preset loaders and `from_preset`, written once for every model family.

A model family registers its presets (plain data, e.g.
`models/t5gemma2_presets.py`) with `register_presets`, and its Hugging Face
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

import json
import os
from pathlib import Path

from keras_hub.layers import ImageConverter
from keras_hub.models import Backbone
from keras_hub.models import Preprocessor
from keras_hub.models import Task
from keras_hub.tokenizers import Tokenizer

from keras_t5gemma.utils.keras_hub_compat import KerasPresetLoader
from keras_t5gemma.utils.keras_hub_compat import classproperty
from keras_t5gemma.utils.keras_hub_compat import get_file

BUNDLED_DIRECTORY = Path(__file__).resolve().parents[1] / "presets"
BUNDLED_SCHEME = "bundled://"
KAGGLE_SCHEME = "kaggle://"

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


def fetch_file(preset, name):
    """KerasHub's `get_file`, with hub errors turned into messages that say what to do."""
    try:
        return get_file(preset, name)
    except FileNotFoundError:
        raise
    except Exception as error:
        kind = type(error).__name__
        if preset.startswith(KAGGLE_SCHEME) and isinstance(error, (OSError, ImportError)):
            raise ConnectionError(
                f"Could not fetch `{name}` of `{preset}` through kagglehub ({kind}: {str(error)[:200]}). "
                "Kaggle is unreachable or kagglehub is missing: attach the model to a Kaggle notebook "
                "(kagglehub then finds it offline), or download the preset folder elsewhere and pass "
                "its path instead."
            ) from error
        if kind == "GatedRepoError":
            raise PermissionError(
                f"`{preset}` is gated. Accept the Gemma license on its Hugging Face page, then log "
                "in with `hf auth login` or set the `HF_TOKEN` environment variable."
            ) from error
        if kind == "RepositoryNotFoundError":
            raise FileNotFoundError(
                f"`{preset}` was not found on the Hugging Face Hub (or is private and no token is set)."
            ) from error
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise ConnectionError(
                f"Could not download `{name}` of `{preset}`: the hub is unreachable or offline mode is "
                "on. Download the checkpoint elsewhere and pass its local folder instead."
            ) from error
        raise


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
    with open(fetch_file(preset, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    if config.get("registered_name") in _FOREIGN_PRESET_LOADERS:
        return _FOREIGN_PRESET_LOADERS[config["registered_name"]](preset, config)
    if "registered_name" in config:
        return KerasPresetLoader(preset, config)
    if "model_type" in config:
        model_type = config["model_type"]
        if model_type not in _CHECKPOINT_LOADERS:
            raise ValueError(
                f"`{preset}` is a Hugging Face checkpoint of `model_type` {model_type!r}; "
                f"keras_t5gemma converts {sorted(_CHECKPOINT_LOADERS)}."
            )
        return _CHECKPOINT_LOADERS[model_type](preset, config)
    raise ValueError(f"`{preset}/config.json` is neither a Keras preset config nor a Hugging Face model config.")


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
        `from_preset`; Hugging Face checkpoints also take `text_only=True`
        (no vision tower) and `dtype`.
        """
        return cls.load_preset(get_preset_loader(preset), *args, **kwargs)

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


def _load_task(cls, loader, load_weights=True, **kwargs):
    return loader.load_task(cls, load_weights, True, **kwargs)


def _load_backbone(cls, loader, load_weights=True, **kwargs):
    return loader.load_backbone(cls, load_weights, **kwargs)


def _load_preprocessor(cls, loader, config_file="preprocessor.json", **kwargs):
    return loader.load_preprocessor(cls, config_file, **kwargs)


def _load_tokenizer(cls, loader, config_file="tokenizer.json", **kwargs):
    return loader.load_tokenizer(cls, config_file, **kwargs)
