"""keras_t5gemma models to Hugging Face `transformers` folders: the weight table run backwards.

Registered as the "transformers" exporter in `keras_t5gemma/conversion/__init__.py`;
`export_to_transformers` on the backbone and every task of both families
calls it. Every tensor comes from the family's weight table (`weight_specs`,
`t5gemma_weight_specs`: the tables the loaders use) through
`WeightSpec.to_checkpoint`, so a checkpoint read in and written out comes
back bit for bit.

What each model becomes:

- backbone, seq2seq LM: `T5Gemma2ForConditionalGeneration`, `T5GemmaForConditionalGeneration`;
- embedder, encoder-only backbone: `T5Gemma2Encoder`, `T5GemmaEncoderModel`;
- text and token classifiers: `T5Gemma2For{Sequence,Token}Classification`,
  `T5GemmaFor{Sequence,Token}Classification` (`is_encoder_decoder` false
  where the backbone has no decoder).

The folder is written next to its destination under a temporary name and
renamed into place when complete (`utils/safe_files.py`), so a failed export
leaves nothing behind.
"""

import json
import re
import struct
from pathlib import Path

import keras
import ml_dtypes
import numpy as np

from keras_t5gemma.conversion.checkpoint import SAFETENSORS_FILE
from keras_t5gemma.conversion.checkpoint import SAFETENSORS_INDEX
from keras_t5gemma.conversion.config import TRANSFORMERS_VERSION
from keras_t5gemma.conversion.config import hf_config_from_backbone
from keras_t5gemma.conversion.image_processor import hf_image_processor_from_converter
from keras_t5gemma.conversion.t5gemma_config import hf_config_from_t5gemma_backbone
from keras_t5gemma.conversion.t5gemma_config import t5gemma_weight_specs
from keras_t5gemma.conversion.vocabulary import tokenizer_json_from_proto
from keras_t5gemma.conversion.weights import classifier_head_specs
from keras_t5gemma.conversion.weights import weight_specs
from keras_t5gemma.models.classification import ClassifierTask
from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder
from keras_t5gemma.utils.safe_files import atomic_folder

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
# What an export writes; `overwrite=True` replaces only folders holding nothing else.
_EXPORT_FILE = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json"
    r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|processor_config\.json)$"
)
# A standalone `T5Gemma2Encoder` (`T5GemmaEncoderModel`: `encoder.`) stores its tensors without `model.encoder.`.
_ENCODER_PREFIX = "model.encoder."


def parse_size(size):
    """Bytes from an int or a string such as `"2GB"`, `"500MB"`, `"40KB"` or `"1GiB"`."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"Cannot read the size {size!r}; write it like `2GB`, `500MB` or a number of bytes.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value < 1:
        raise ValueError(f"A shard size must be positive; got {size!r}.")
    return value


def _parts(model):
    """`(backbone, preprocessor or None, encoder_only)` of a backbone, task or embedder."""
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, (T5Gemma2Backbone, T5GemmaBackbone)):
        raise ValueError(
            f"Export to `transformers` covers the T5Gemma and T5Gemma 2 models; `{type(backbone).__name__}` is not one."
        )
    preprocessor = getattr(model, "preprocessor", None)
    # An embedder only needs the encoder, whatever its backbone holds.
    encoder_only = backbone.decoder is None or isinstance(model, T5Gemma2Embedder)
    return backbone, preprocessor, encoder_only


def _check_not_quantized(backbone):
    quantized = sorted(
        {layer.quantization_mode for layer in backbone._flatten_layers() if getattr(layer, "quantization_mode", None)}
    )
    if quantized:
        raise ValueError(
            f"This model is quantized ({', '.join(quantized)}); transformers' T5Gemma models have no layout for "
            "quantized weights. Export the model before calling `quantize()` (load the preset again)."
        )


def _tensors(backbone, encoder_only, classifier=None):
    """`[(checkpoint key, WeightSpec)]` in table order (a classifier's head last); LoRA kernels read merged.

    An encoder-only model without a head is a standalone encoder, its keys without `model.encoder.`
    (`encoder.` for T5Gemma); an encoder-only T5Gemma classifier keeps them.
    """
    first_family = isinstance(backbone, T5GemmaBackbone)
    specs = t5gemma_weight_specs(backbone) if first_family else weight_specs(backbone)
    standalone = "encoder." if first_family else ""
    tensors = []
    for spec in specs:
        key = spec.key
        if encoder_only:
            if not key.startswith(_ENCODER_PREFIX):
                continue
            if classifier is None:
                key = standalone + key[len(_ENCODER_PREFIX) :]
        tensors.append((key, spec))
    if classifier is not None:
        tensors.extend((spec.key, spec) for spec in classifier_head_specs(classifier))
    return tensors


def _classifier_config(classifier):
    """The config entries of `T5Gemma2ForSequenceClassification` / `...ForTokenClassification`."""
    if keras.activations.get(classifier.activation) is not keras.activations.linear:
        raise ValueError(
            f"This classifier applies `activation={classifier.activation!r}` to its scores; transformers' "
            "classification heads give logits. Export a classifier built with `activation=None`."
        )
    labels = classifier.labels or [f"LABEL_{i}" for i in range(classifier.num_classes)]
    kind = "Token" if classifier.per_token else "Sequence"
    family = "T5Gemma" if isinstance(classifier.backbone, T5GemmaBackbone) else "T5Gemma2"
    return {
        "architectures": [f"{family}For{kind}Classification"],
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "classifier_dropout_rate": classifier.dropout,
    }


def _checkpoint_shape(spec):
    # A zero-strided stand-in gives the shape without reading or copying the weight.
    stand_in = np.broadcast_to(np.zeros((), np.int8), spec.shape)
    return tuple(spec.to_checkpoint(stand_in).shape)


def _write_safetensors(path, entries, dtype):
    """Writes `[(key, spec)]` to one safetensors file, one tensor in memory at a time.

    Written here rather than by `safetensors.numpy.save_file`, which takes
    all of a file's tensors at once: every tensor of a shard (up to
    `max_shard_size`, 2 GB by default) converted to the export's layout and
    dtype would be held beside the model, where this holds one. The format
    is safetensors' own (an 8-byte little-endian header length, the JSON
    header padded to 8 bytes, the tensors in header order); the library
    reads what this writes (the export's tests load it with `transformers`).
    """
    numpy_dtype = _NUMPY_DTYPES[dtype]
    itemsize = np.dtype(numpy_dtype).itemsize
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, spec in entries:
        shape = _checkpoint_shape(spec)
        size = int(np.prod(shape)) * itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for key, spec in entries:
            array = spec.to_checkpoint(spec.value())
            file.write(np.ascontiguousarray(array.astype(numpy_dtype, copy=False)).tobytes())


def _write_weights(folder, tensors, dtype, max_shard_size):
    """One `model.safetensors`, or shards of at most `max_shard_size` bytes and their index."""
    itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    shards, current, current_size, total_size = [], [], 0, 0
    for key, spec in tensors:
        size = int(np.prod(spec.shape)) * itemsize
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append((key, spec))
        current_size += size
        total_size += size
    shards.append(current)
    if len(shards) == 1:
        _write_safetensors(folder / SAFETENSORS_FILE, shards[0], dtype)
        return [SAFETENSORS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_safetensors(folder / name, shard, dtype)
        weight_map.update({key: name for key, _ in shard})
    _write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    return names


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, ensure_ascii=False)
        file.write("\n")


def _special_ids(tokenizer, backbone):
    """pad/bos/eos and start-of-image ids: the tokenizer's, else Gemma 3's layout."""
    if isinstance(backbone, T5GemmaBackbone):
        if tokenizer is None:
            return {"pad": 0, "bos": 2, "eos": 1}
        return {"pad": tokenizer.pad_token_id, "bos": tokenizer.start_token_id, "eos": tokenizer.end_token_id}
    if tokenizer is None:
        # Gemma 3 puts <start_of_image> just before <end_of_image>.
        return {"pad": 0, "bos": 2, "eos": 1, "boi": backbone.eoi_token_index - 1}
    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.start_token_id,
        "eos": tokenizer.end_token_id,
        "boi": tokenizer.start_of_image_token_id,
    }


def _write_tokenizer(folder, preprocessor, backbone):
    tokenizer = preprocessor.tokenizer
    add_bos = bool(getattr(preprocessor, "add_start_token", True))
    add_eos = bool(getattr(preprocessor, "add_end_token", False))
    tokenizer_json = tokenizer_json_from_proto(tokenizer.proto, add_bos, add_eos)
    _write_json(folder / "tokenizer.json", tokenizer_json)
    # transformers' GemmaTokenizer replaces the file's normaliser and pre-tokenizer with Gemma 3's; a
    # vocabulary that normalises otherwise (NFKC, a dummy prefix) needs the generic class, which keeps them.
    gemma_style = tokenizer_json["normalizer"] is None and tokenizer_json["pre_tokenizer"]["prepend_scheme"] == "never"
    vocabulary = set(tokenizer.get_vocabulary())
    special = {
        "bos_token": tokenizer.start_token,
        "eos_token": tokenizer.end_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": "<unk>",
        # Gemma 3's vocabulary has a <mask> piece; without one, transformers would append it.
        "mask_token": "<mask>" if "<mask>" in vocabulary else None,
    }
    image_tokens = {}
    if backbone.vision_encoder is not None:
        image_tokens = {
            "boi_token": tokenizer.start_of_image_token,
            "eoi_token": tokenizer.end_of_image_token,
            "image_token": tokenizer.image_placeholder_token,
        }
    config = {
        "tokenizer_class": "GemmaTokenizer" if gemma_style else "PreTrainedTokenizerFast",
        "backend": "tokenizers",
        **special,
        **image_tokens,
        "model_specific_special_tokens": image_tokens,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
    }
    if image_tokens:
        config["processor_class"] = "Gemma3Processor"
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", {k: v for k, v in {**special, **image_tokens}.items() if v})


def _write_processor(folder, preprocessor, backbone):
    converter = preprocessor.image_converter
    if converter is None:
        return
    image_processor = hf_image_processor_from_converter(converter.image_size, converter.scale, converter.offset)
    size = backbone.vision_encoder.image_size
    if image_processor["size"] != {"height": size, "width": size}:
        raise ValueError(
            f"The image converter resizes to {converter.image_size} but the vision tower takes {size}x{size} images."
        )
    _write_json(
        folder / "processor_config.json",
        {
            "processor_class": "Gemma3Processor",
            "image_processor": image_processor,
            "image_seq_length": backbone.vision_encoder.mm_tokens_per_image,
        },
    )


def _check_destination(path, overwrite):
    """Raises unless `path` is absent, an empty folder, or (with `overwrite`) an earlier export."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"`{path}` exists and is not a folder.")
    contents = sorted(entry.name for entry in path.iterdir())
    if not contents:
        return
    if not overwrite:
        raise ValueError(f"`{path}` is not empty; pass `overwrite=True` to replace an earlier export there.")
    foreign = [name for name in contents if not _EXPORT_FILE.match(name) or not (path / name).is_file()]
    if foreign or "config.json" not in contents:
        raise ValueError(
            f"`{path}` holds files an export does not write ({foreign[:5] or 'no config.json'}); "
            "refusing to replace it. Choose another folder."
        )


def export_to_transformers(model, path, dtype=None, max_shard_size="2GB", overwrite=False):
    """Writes `model` (a backbone or task of either family) as a `transformers` folder.

    See `t5gemma2_task.export_to_transformers` for the arguments.
    Returns the folder's path.
    """
    backbone, preprocessor, encoder_only = _parts(model)
    _check_not_quantized(backbone)
    # A T5Gemma encoder-only backbone has only its encoder's table.
    embedding = backbone.token_embedding if backbone.token_embedding is not None else backbone.encoder_token_embedding
    table = embedding.table
    dtype = dtype or keras.backend.standardize_dtype(table.embeddings.dtype)
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(_NUMPY_DTYPES)}; got {dtype!r}.")
    max_shard_size = parse_size(max_shard_size)
    path = Path(path).expanduser().absolute()
    tokenizer = getattr(preprocessor, "tokenizer", None)
    ids = _special_ids(tokenizer, backbone)
    classifier = model if isinstance(model, ClassifierTask) else None
    if classifier is not None:
        # The reference builds the decoder input from `bos_token_id` and reads the head by `pad_token_id`.
        ids.update(bos=classifier.start_token_id, pad=classifier.pad_token_id)
    if isinstance(backbone, T5GemmaBackbone):
        config = hf_config_from_t5gemma_backbone(
            backbone,
            encoder_decoder=not encoder_only,
            pad_token_id=ids["pad"],
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            dtype=dtype,
        )
        config["architectures"] = ["T5GemmaEncoderModel" if encoder_only else "T5GemmaForConditionalGeneration"]
    else:
        config = hf_config_from_backbone(
            backbone if not encoder_only or backbone.decoder is None else _EncoderView(backbone),
            boi_token_id=ids["boi"],
            pad_token_id=ids["pad"],
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            dtype=dtype,
        )
    if classifier is not None:
        config.update(_classifier_config(classifier))
    _check_destination(path, overwrite)
    # Written beside `path` and renamed into place: a failed export leaves nothing, or the earlier export.
    with atomic_folder(path, owns=_EXPORT_FILE.match, overwrite=overwrite, what="export folder") as staging:
        staging = Path(staging)
        _write_weights(staging, _tensors(backbone, encoder_only, classifier), dtype, max_shard_size)
        _write_json(staging / "config.json", config)
        if not encoder_only:
            generation = {
                "bos_token_id": ids["bos"],
                "decoder_start_token_id": ids["bos"],
                "eos_token_id": ids["eos"],
                "pad_token_id": ids["pad"],
                "transformers_version": TRANSFORMERS_VERSION,
            }
            _write_json(staging / "generation_config.json", generation)
        if tokenizer is not None:
            _write_tokenizer(staging, preprocessor, backbone)
            if getattr(preprocessor, "image_converter", None) is not None:
                _write_processor(staging, preprocessor, backbone)
    return path


class _EncoderView:
    """A backbone seen without its decoder (an embedder exports the encoder only)."""

    def __init__(self, backbone):
        self._backbone = backbone
        self.decoder = None

    def __getattr__(self, name):
        return getattr(self._backbone, name)
