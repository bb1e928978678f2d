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

import contextvars
import json
import os
import re
from pathlib import Path

from keras_hub.layers import ImageConverter
from keras_hub.models import Backbone
from keras_hub.models import Preprocessor
from keras_hub.models import Task
from keras_hub.tokenizers import Tokenizer

from keras_t5gemma.utils.keras_hub_compat import KerasPresetLoader
from keras_t5gemma.utils.keras_hub_compat import classproperty
from keras_t5gemma.utils.keras_hub_compat import get_file
from keras_t5gemma.utils.safe_files import atomic_folder

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
# What `save_to_preset` writes in a preset folder (KerasHub's files, sharded
# weights, and `DESCRIPTION`, the first line of which the registry shows).
_PRESET_ENTRIES = re.compile(
    r"^(config|task|preprocessor|tokenizer|image_converter|audio_converter|video_converter|metadata"
    r"|model\.weights)\.json$|^(model|task)(_\d+)?\.weights\.h5$|^assets$|^DESCRIPTION$"
)
# The `quantize` modes `from_preset` accepts.
QUANTIZE_MODES = ("int8",)
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


# Hub endpoints that answered once in this process.
_REACHABLE_ENDPOINTS = set()


def _hub_unreachable():
    """Why the Hugging Face Hub cannot be reached, or `None` if it can (or a proxy decides).

    `huggingface_hub` retries a failed request five times over some 25
    seconds before it gives up; one connection attempt answers at once.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if constants.HF_HUB_OFFLINE or endpoint in _REACHABLE_ENDPOINTS or any(os.environ.get(p) for p in proxies):
        return None
    import socket

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as error:
        return f"{endpoint} did not answer ({error})"
    _REACHABLE_ENDPOINTS.add(endpoint)
    return None


def _cached_hub_file(preset, name):
    """The local copy of `name` of an `hf://` handle in the Hugging Face cache, or `None`."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(preset.split("://", 1)[1], name)
    return path if isinstance(path, str) else None


def fetch_file(preset, name):
    """KerasHub's `get_file`, with hub errors turned into messages that say what to do.

    Without a network an `hf://` handle is served from the Hugging Face cache,
    or refused at once with a `ConnectionError`.
    """
    if preset.startswith("hf://"):
        reason = _hub_unreachable()
        if reason is not None:
            cached = _cached_hub_file(preset, name)
            if cached is None:
                raise ConnectionError(
                    f"Cannot reach the Hugging Face Hub to download `{name}` of `{preset}`: {reason}, and "
                    "the file is not in the local cache. Check the network, or download the checkpoint "
                    "elsewhere and pass its local folder instead."
                )
            return cached
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


def read_json_file(path, what=None):
    """A JSON object from `path`; errors name the file (`what`, if given, in its place).

    Raises:
        ValueError: the file is not UTF-8 JSON holding an object.
    """
    what = what or f"`{path}`"
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} is not UTF-8 text ({error.reason}).") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must hold a JSON object; it holds a {type(value).__name__}.")
    return value


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
    def from_preset(cls, preset, *args, quantize=None, **kwargs):
        """Loads a named preset, a Keras preset folder or a Hugging Face checkpoint.

        `preset` is a name from `cls.presets`, a folder written by
        `save_to_preset`, an `hf://` handle or a local Hugging Face folder.
        The other arguments are those of the KerasHub base class's
        `from_preset`; Hugging Face checkpoints also take `text_only=True`
        (no vision tower) and `dtype`.

        `quantize="int8"` (backbones and tasks) gives the model of
        `model.quantize("int8")`, weights and arithmetic alike. A Hugging Face
        checkpoint loads straight into it: each float tensor is quantized as
        it is read and no float copy of the model is held (the other weights
        get `dtype`). A Keras preset folder (the bundled presets) is loaded in
        `dtype`, then quantized; a KerasHub preset is read through KerasHub's
        float model.
        """
        loader = get_preset_loader(preset)
        if quantize is None:
            return cls.load_preset(loader, *args, **kwargs)
        check_quantize_mode(quantize)
        if not issubclass(cls, (Backbone, Task)):
            raise ValueError(f"`quantize` applies to backbones and tasks, not to `{cls.__name__}`.")
        if getattr(loader, "loads_quantized", False):
            return cls.load_preset(loader, *args, quantize=quantize, **kwargs)
        model = cls.load_preset(loader, *args, **kwargs)
        model.quantize(quantize)
        return model

    def save_to_preset(self, preset_dir, *args, overwrite=False, **kwargs):
        """KerasHub's `save_to_preset`, written atomically and refusing to clobber a folder.

        The preset is written to a temporary folder beside `preset_dir` and
        renamed into place, so an interruption leaves no half-written preset.
        A non-empty `preset_dir` is refused unless `overwrite=True`; then the
        previous preset's files are replaced and none of them is left behind,
        while files the preset format does not hold (a README, notes) are kept.

        Raises:
            FileExistsError: `preset_dir` is a file, or a non-empty folder
                without `overwrite=True`.
        """
        if _SAVING_INTO.get() is not None:
            return super().save_to_preset(preset_dir, *args, **kwargs)
        with atomic_folder(os.fspath(preset_dir), is_preset_entry, overwrite, "preset folder") as temporary:
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


def _load_task(cls, loader, load_weights=True, **kwargs):
    return loader.load_task(cls, load_weights, True, **kwargs)


def _load_backbone(cls, loader, load_weights=True, **kwargs):
    return loader.load_backbone(cls, load_weights, **kwargs)


def _load_preprocessor(cls, loader, config_file="preprocessor.json", **kwargs):
    return loader.load_preprocessor(cls, config_file, **kwargs)


def _load_tokenizer(cls, loader, config_file="tokenizer.json", **kwargs):
    return loader.load_tokenizer(cls, config_file, **kwargs)
