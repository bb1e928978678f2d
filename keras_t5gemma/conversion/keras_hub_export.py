"""This package's T5Gemma 2 out to a KerasHub 0.32 preset folder (`export_to_keras_hub`).

The other direction from `keras_hub_preset.py`: the backbone's arguments become
KerasHub's `T5Gemma2Backbone` config, each KerasHub variable is filled from
ours through the same Hugging Face key (`weight_specs` here,
`keras_hub_tensors`' variable lists there), and KerasHub's own
`save_to_preset` writes the folder, so `keras_hub.models.T5Gemma2Seq2SeqLM.from_preset`
reads it as one of its own. Registered as the `"keras-hub"` exporter.

A vision tower becomes KerasHub's `Gemma3VisionEncoder` (its variables
named by the same keys, `_vision_variables`), the end-of-image vector both of
KerasHub's copies, and a task's image converter KerasHub's
`T5Gemma2ImageConverter` with the same size, scale and offset. KerasHub's
converter crops to the aspect ratio without antialiasing where ours stretches
with it, so only square images of the model's size preprocess the same.

What KerasHub cannot represent, and is refused: a full-attention RoPE base
other than 1,000,000 or a sliding-layer RoPE scaling (KerasHub fixes both),
quantized weights, and a task whose image placeholder is not its vocabulary's
`<image_soft_token>` piece (where KerasHub's preprocessor puts images). What
differs and is said: KerasHub's text-only model has no end-of-image vector and
embeds that token from the table, so inputs holding `eoi_token_index` compute
differently there (a warning gives the difference).
"""

import logging
from pathlib import Path

import keras
import numpy as np
from keras_hub.layers import T5Gemma2ImageConverter as KerasHubT5Gemma2ImageConverter
from keras_hub.models import Gemma3VisionEncoder as KerasHubGemma3VisionEncoder
from keras_hub.models import T5Gemma2Backbone as KerasHubT5Gemma2Backbone
from keras_hub.models import T5Gemma2Seq2SeqLM as KerasHubT5Gemma2Seq2SeqLM
from keras_hub.models import T5Gemma2Seq2SeqLMPreprocessor as KerasHubT5Gemma2Seq2SeqLMPreprocessor
from keras_hub.models import T5Gemma2Tokenizer as KerasHubT5Gemma2Tokenizer

from keras_t5gemma.conversion.keras_hub_preset import _IMAGE_PLACEHOLDER_PIECE
from keras_t5gemma.conversion.keras_hub_preset import _text_layer_variables
from keras_t5gemma.conversion.keras_hub_preset import _vision_variables
from keras_t5gemma.conversion.transformers_export import _check_not_quantized
from keras_t5gemma.conversion.transformers_export import _parts
from keras_t5gemma.conversion.weights import weight_specs
from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import SHARED_SCALARS
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import STACK_SIZES
from keras_t5gemma.utils.safe_files import atomic_folder

logger = logging.getLogger(__name__)

# What KerasHub's `save_to_preset` writes (and so what an earlier export may be replaced).
_PRESET_ENTRIES = {
    "config.json",
    "model.weights.h5",
    "model.weights.json",
    "task.json",
    "task.weights.h5",
    "preprocessor.json",
    "image_converter.json",
    "tokenizer.json",
    "metadata.json",
    "assets",
}


def keras_hub_backbone_config(backbone):
    """KerasHub 0.32 `T5Gemma2Backbone` arguments for `backbone`, or a `ValueError` naming what it cannot hold."""
    if backbone.decoder is None:
        raise ValueError("The backbone has no decoder (`encoder_only=True`); KerasHub's T5Gemma 2 needs one.")
    for side in ("encoder", "decoder"):
        rope = backbone.stack_rope(side)
        if rope[FULL][0] != 1_000_000.0 or rope[SLIDING][1] != 1.0:
            raise ValueError(
                f"The {side} uses RoPE base {rope[FULL][0]} on full layers and scaling {rope[SLIDING][1]} on sliding "
                "ones; KerasHub fixes them to 1,000,000 and 1.0."
            )
    config = {"vocabulary_size": backbone.vocabulary_size}
    for side in ("encoder", "decoder"):
        config.update({f"{side}_{name}": getattr(backbone, f"{side}_{name}") for name in STACK_SIZES})
        config[f"{side}_layer_types"] = list(getattr(backbone, f"{side}_layer_types"))
    config.update({name: getattr(backbone, name) for name in SHARED_SCALARS})
    config.update(attention_bias=False, hidden_activation="gelu_approximate", tie_word_embeddings=True)
    config["eoi_token_index"] = backbone.eoi_token_index
    return config


def _keras_hub_vision_encoder(vision_encoder, dtype):
    """KerasHub's `Gemma3VisionEncoder` of `vision_encoder`'s sizes (its weights still to fill)."""
    return KerasHubGemma3VisionEncoder(
        image_size=vision_encoder.image_size,
        patch_size=vision_encoder.patch_size,
        num_heads=vision_encoder.num_heads,
        hidden_dim=vision_encoder.hidden_dim,
        num_layers=vision_encoder.num_layers,
        intermediate_dim=vision_encoder.intermediate_dim,
        output_dim=vision_encoder.output_dim,
        pool_size=vision_encoder.pool_size,
        layer_norm_epsilon=vision_encoder.layer_norm_epsilon,
        dtype=dtype,
    )


def _keras_hub_variables(keras_hub_backbone):
    """`(Hugging Face key, KerasHub variable)` for every weight of KerasHub's backbone."""
    for side in ("encoder", "decoder"):
        for i in range(getattr(keras_hub_backbone, f"{side}_num_layers")):
            layer = keras_hub_backbone.get_layer(f"{side}_layer_{i}")
            attention = layer.self_attn if side == "encoder" else layer.merged_attn
            yield from _text_layer_variables(layer, attention, f"model.{side}.layers.{i}")
    yield "model.encoder.norm.weight", keras_hub_backbone.encoder_norm.scale
    yield "model.decoder.norm.weight", keras_hub_backbone.decoder_norm.scale
    yield "model.encoder.embed_tokens.weight", keras_hub_backbone.token_embedding.embeddings
    yield "model.encoder.embed_tokens.weight", keras_hub_backbone.decoder_token_embedding.embeddings
    if keras_hub_backbone.vision_encoder is not None:
        # KerasHub keeps an end-of-image vector (and a table) per side; T5Gemma 2 ties them.
        yield "model.encoder.embed_tokens.eoi_embedding", keras_hub_backbone.encoder_eoi_embedding
        yield "model.encoder.embed_tokens.eoi_embedding", keras_hub_backbone.decoder_eoi_embedding
        yield from _vision_variables(keras_hub_backbone.vision_encoder, "model.encoder")


def keras_hub_backbone_from(backbone):
    """A KerasHub `T5Gemma2Backbone` holding `backbone`'s weights (in its dtype)."""
    _check_not_quantized(backbone)
    dtype = keras.backend.standardize_dtype(backbone.token_embedding.table.embeddings.dtype)
    vision_encoder = None
    if backbone.vision_encoder is not None:
        vision_encoder = _keras_hub_vision_encoder(backbone.vision_encoder, dtype)
    keras_hub_backbone = KerasHubT5Gemma2Backbone(
        **keras_hub_backbone_config(backbone), vision_encoder=vision_encoder, dtype=dtype
    )
    ours = {spec.key: spec for spec in weight_specs(backbone)}
    for key, variable in _keras_hub_variables(keras_hub_backbone):
        # Both are Keras kernels ([in..., out...]); only how the head axes are split may differ.
        value = ours[key].value()
        variable.assign(np.reshape(value, tuple(variable.shape)))
    if vision_encoder is None:
        _warn_about_end_of_image(backbone)
    return keras_hub_backbone


def _warn_about_end_of_image(backbone):
    embedding = backbone.token_embedding
    eoi = backbone.eoi_token_index
    if not 0 <= eoi < backbone.vocabulary_size:
        return
    table = keras.ops.convert_to_numpy(embedding.table.embeddings)
    scaled_row = table[eoi].astype("float32") * np.float32(np.sqrt(table.shape[1]))
    vector = keras.ops.convert_to_numpy(embedding.eoi_embedding).astype("float32")
    difference = float(np.max(np.abs(vector - scaled_row)))
    if difference > 1e-6 * max(1.0, float(np.max(np.abs(scaled_row)))):
        logger.warning(
            "KerasHub's text-only T5Gemma 2 embeds the end-of-image token (id %d) from the table; this model "
            "has a learned vector for it (largest difference %.3g), so inputs holding that id compute "
            "differently there.",
            eoi,
            difference,
        )


def _keras_hub_preprocessor(preprocessor, backbone):
    tokenizer = preprocessor.tokenizer
    image_converter = preprocessor.image_converter
    vision = {}
    if backbone.vision_encoder is not None and image_converter is not None:
        # KerasHub's preprocessor finds the image positions by this piece, not by the backbone's id.
        placeholder = tokenizer.token_to_id(_IMAGE_PLACEHOLDER_PIECE)
        if placeholder != backbone.image_token_index:
            raise ValueError(
                f"KerasHub's preprocessor puts images where the vocabulary's `{_IMAGE_PLACEHOLDER_PIECE}` piece "
                f"is (id {placeholder} here), but this model's image placeholder is id "
                f"{backbone.image_token_index}; export the backbone alone, or use a vocabulary where they agree."
            )
        size = backbone.vision_encoder.image_size
        vision = {
            "image_converter": KerasHubT5Gemma2ImageConverter(
                image_size=tuple(image_converter.image_size or (size, size)),
                scale=image_converter.scale,
                offset=image_converter.offset,
            ),
            "num_vision_tokens_per_image": backbone.vision_encoder.mm_tokens_per_image,
        }
    return KerasHubT5Gemma2Seq2SeqLMPreprocessor(
        tokenizer=KerasHubT5Gemma2Tokenizer(proto=tokenizer.proto),
        **vision,
        encoder_sequence_length=preprocessor.encoder_sequence_length,
        decoder_sequence_length=preprocessor.decoder_sequence_length,
        add_start_token=preprocessor.add_start_token,
        add_end_token=preprocessor.add_end_token,
    )


def export_to_keras_hub(model, path, overwrite=False):
    """Writes `model` (a `T5Gemma2Backbone` or `T5Gemma2Seq2SeqLM`) as a KerasHub 0.32 preset folder.

    A task with a preprocessor gets KerasHub's task, preprocessor and
    tokenizer files too, so `keras_hub.models.T5Gemma2Seq2SeqLM.from_preset(path)`
    builds it whole; a backbone gets KerasHub's backbone files.

    Args:
        model: a `T5Gemma2Backbone` or `T5Gemma2Seq2SeqLM`, with or without a vision tower.
        path: the folder; absent, empty, or (with `overwrite`) an earlier export.
        overwrite: bool, replace what an earlier export wrote there.

    Returns:
        The folder's path.

    Raises:
        ValueError: what KerasHub cannot represent (see the module docstring).
        FileExistsError: `path` holds files this export does not write.
    """
    backbone, preprocessor, encoder_only = _parts(model)
    if encoder_only:
        raise ValueError("An encoder-only model cannot be a KerasHub T5Gemma 2; export a T5Gemma2Seq2SeqLM.")
    keras_hub_backbone = keras_hub_backbone_from(backbone)
    path = Path(path).expanduser().absolute()
    with atomic_folder(path, owns=_PRESET_ENTRIES.__contains__, overwrite=overwrite, what="export folder") as staging:
        if preprocessor is None and model is backbone:
            keras_hub_backbone.save_to_preset(staging)
        else:
            task = KerasHubT5Gemma2Seq2SeqLM(
                backbone=keras_hub_backbone,
                preprocessor=None if preprocessor is None else _keras_hub_preprocessor(preprocessor, backbone),
            )
            task.save_to_preset(staging)
    return path
