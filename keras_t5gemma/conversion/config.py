"""Hugging Face `config.json` of T5Gemma 2 to `T5Gemma2Backbone` arguments.

Accepts the current spelling (`rope_parameters` per layer type, `layer_types`)
and the earlier one (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
`sliding_window_pattern`).
"""

import warnings

from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

# Defaults of the reference config classes, used when a field is absent.
_DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
_TEXT_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "head_dim": 256,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
}
# Fields the encoder and decoder must agree on, because the backbone shares them
# (the reference refuses unequal widths and vocabularies itself).
_SHARED_FIELDS = (
    "hidden_size",
    "vocab_size",
    "rms_norm_eps",
    "query_pre_attn_scalar",
    "sliding_window",
    "attn_logit_softcapping",
)
# Per-stack sizes: Hugging Face text-config field -> the backbone's argument suffix.
_STACK_FIELDS = {
    "hidden_size": "hidden_dim",
    "intermediate_size": "intermediate_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}


def _differing(encoder_value, decoder_value):
    """The encoder's value where it differs from the decoder's, else None (KerasHub's overrides)."""
    return None if encoder_value == decoder_value else encoder_value


def _get(text_config, name):
    return text_config.get(name, _TEXT_DEFAULTS.get(name))


def _rope(text_config):
    """`{layer type: (wavelength, linear scaling factor)}` from either spelling."""
    parameters = text_config.get("rope_parameters")
    if parameters is None or not any(t in parameters for t in (FULL, SLIDING)):
        full = {"rope_type": "default", "rope_theta": text_config.get("rope_theta", _DEFAULT_THETA[FULL])}
        scaling = text_config.get("rope_scaling") or parameters or {}
        full.update(scaling)
        if "type" in scaling:
            full["rope_type"] = scaling["type"]
        sliding = {
            "rope_type": "default",
            "rope_theta": text_config.get("rope_local_base_freq", _DEFAULT_THETA[SLIDING]),
        }
        parameters = {FULL: full, SLIDING: sliding}
    rope = {}
    for layer_type in (SLIDING, FULL):
        entry = dict(parameters.get(layer_type) or {})
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(
                f"RoPE type `{rope_type}` for {layer_type} layers is not supported; "
                "T5Gemma 2 uses `default` and `linear`."
            )
        factor = float(entry.get("factor", 1.0)) if rope_type == "linear" else 1.0
        rope[layer_type] = (float(entry.get("rope_theta", _DEFAULT_THETA[layer_type])), factor)
    return rope


def _layer_types(text_config):
    layer_types = text_config.get("layer_types")
    if layer_types is None:
        pattern = text_config.get("sliding_window_pattern", text_config.get("_sliding_window_pattern", 6))
        layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(text_config["num_hidden_layers"])]
    return list(layer_types)


def check_t5gemma2_config(config):
    """Raises a clear error unless `config` is a T5Gemma 2 `config.json`."""
    model_type = config.get("model_type")
    if model_type != "t5gemma2":
        raise ValueError(
            f'Expected a T5Gemma 2 checkpoint (`model_type` "t5gemma2"), got `model_type` '
            f"{model_type!r}. T5Gemma (version 1) and Gemma 3 checkpoints are different models."
        )
    for section in ("encoder", "decoder"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"The T5Gemma 2 config has no `{section}` section.")


def vision_encoder_kwargs_from_hf_config(vision_config, mm_tokens_per_image, output_dim):
    """`T5Gemma2VisionEncoder` arguments for a SigLIP vision config (a dict)."""
    activation = vision_config.get("hidden_act", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Unsupported vision activation `{activation}`; SigLIP uses tanh-approximate GeLU.")
    if vision_config.get("num_channels", 3) != 3:
        raise ValueError("Only 3-channel (RGB) vision towers are supported.")
    return {
        "image_size": vision_config.get("image_size", 224),
        "patch_size": vision_config.get("patch_size", 16),
        "hidden_dim": vision_config.get("hidden_size", 768),
        "intermediate_dim": vision_config.get("intermediate_size", 3072),
        "num_layers": vision_config.get("num_hidden_layers", 12),
        "num_heads": vision_config.get("num_attention_heads", 12),
        "output_dim": output_dim,
        "mm_tokens_per_image": mm_tokens_per_image,
        "layer_norm_epsilon": vision_config.get("layer_norm_eps", 1e-6),
        "attention_dropout": float(vision_config.get("attention_dropout", 0.0)),
    }


def backbone_from_hf_config(config, text_only=False, encoder_only=False, dtype=None, cls=T5Gemma2Backbone, remat=False):
    """A `cls` backbone (random weights) for a T5Gemma 2 `config.json` dict.

    `text_only` leaves out the vision tower, `encoder_only` the decoder;
    `remat` rematerialises each transformer layer in the backward pass;
    `cls` is `T5Gemma2Backbone` or a subclass.
    """
    kwargs = backbone_kwargs_from_hf_config(config)
    vision_config = kwargs.pop("vision_config", None)
    mm_tokens_per_image = kwargs.pop("mm_tokens_per_image", None)
    if vision_config is not None and not text_only:
        kwargs["vision_encoder"] = T5Gemma2VisionEncoder(
            **vision_encoder_kwargs_from_hf_config(vision_config, mm_tokens_per_image, kwargs["encoder_hidden_dim"]),
            dtype=dtype,
            name="vision_encoder",
        )
    return cls(**kwargs, encoder_only=encoder_only, remat=remat, dtype=dtype)


def backbone_kwargs_from_hf_config(config):
    """Backbone keyword arguments for a T5Gemma 2 `config.json` (a dict).

    The vision tower's arguments are returned under `"vision_config"` (a dict
    of the SigLIP config) when present; the caller builds the vision encoder.
    """
    check_t5gemma2_config(config)
    encoder_config = config["encoder"]
    encoder_text = encoder_config.get("text_config", encoder_config)
    decoder_text = config["decoder"]
    for name in _SHARED_FIELDS:
        if _get(encoder_text, name) != _get(decoder_text, name):
            raise ValueError(
                f"Encoder and decoder differ in `{name}` ({_get(encoder_text, name)} vs "
                f"{_get(decoder_text, name)}); this port shares it between them."
            )
    encoder_rope, decoder_rope = _rope(encoder_text), _rope(decoder_text)
    if encoder_rope[FULL][0] != decoder_rope[FULL][0] or encoder_rope[SLIDING][1] != decoder_rope[SLIDING][1]:
        raise ValueError(
            "Encoder and decoder differ in the full layers' RoPE base or the sliding layers' scaling; "
            "this port (as KerasHub's) lets only the sliding base and the full layers' scaling differ."
        )
    for text_config in (encoder_text, decoder_text):
        activation = _get(text_config, "hidden_activation")
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Unsupported activation `{activation}`; T5Gemma 2 uses tanh-approximate GeLU.")
        if _get(text_config, "attention_bias"):
            raise ValueError("Attention biases are not supported; T5Gemma 2 has none.")
    if not config.get("tie_word_embeddings", True):
        raise ValueError(
            "Untied word embeddings are not supported: T5Gemma 2 shares one table between the "
            "encoder, the decoder and the output projection."
        )
    if (
        _get(decoder_text, "attn_logit_softcapping") is not None
        or _get(encoder_text, "attn_logit_softcapping") is not None
    ):
        warnings.warn(
            "The config sets `attn_logit_softcapping`, which the reference T5Gemma 2 "
            "implementation (transformers 5.23) does not apply; the converted model does not "
            "apply it either, so its outputs match the reference."
        )

    eoi_token_index = config.get("eoi_token_index", encoder_config.get("eoi_token_index", 256_000))
    kwargs = {"vocabulary_size": decoder_text["vocab_size"]}
    for side, text_config in (("encoder", encoder_text), ("decoder", decoder_text)):
        for field, name in _STACK_FIELDS.items():
            kwargs[f"{side}_{name}"] = _get(text_config, field)
        kwargs[f"{side}_layer_types"] = _layer_types(text_config)
    kwargs.update(
        {
            "sliding_window": _get(decoder_text, "sliding_window"),
            "query_pre_attn_scalar": _get(decoder_text, "query_pre_attn_scalar"),
            "rope_max_wavelength": decoder_rope[SLIDING][0],
            "local_rope_scaling_factor": decoder_rope[SLIDING][1],
            "global_rope_max_wavelength": decoder_rope[FULL][0],
            "global_rope_scaling_factor": decoder_rope[FULL][1],
            "encoder_rope_max_wavelength": _differing(encoder_rope[SLIDING][0], decoder_rope[SLIDING][0]),
            "encoder_global_rope_scaling_factor": _differing(encoder_rope[FULL][1], decoder_rope[FULL][1]),
            "rms_norm_eps": _get(decoder_text, "rms_norm_eps"),
            "final_logit_softcapping": _get(decoder_text, "final_logit_softcapping"),
            "dropout_rate": float(config.get("dropout_rate", 0.0)),
            "attention_dropout": float(config.get("attention_dropout", 0.0)),
            "eoi_token_index": eoi_token_index,
            "image_token_index": config.get("image_token_index", encoder_config.get("image_token_index", 256_001)),
        }
    )
    vision_config = encoder_config.get("vision_config")
    if vision_config is not None:
        kwargs["vision_config"] = dict(vision_config)
        kwargs["mm_tokens_per_image"] = encoder_config.get("mm_tokens_per_image", 256)
    return kwargs


# === Backbone -> Hugging Face config (the inverse, for export) ===

TRANSFORMERS_VERSION = "5.23.0"


def _rope_entry(wavelength, factor):
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": float(wavelength)}
    return {"rope_type": "linear", "factor": float(factor), "rope_theta": float(wavelength)}


def _text_config_for_export(backbone, model_type, side, special_ids):
    rope = backbone.stack_rope(side)
    return {
        "model_type": model_type,
        "vocab_size": backbone.vocabulary_size,
        **{field: getattr(backbone, f"{side}_{name}") for field, name in _STACK_FIELDS.items()},
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": backbone.rms_norm_eps,
        "query_pre_attn_scalar": backbone.query_pre_attn_scalar,
        # Without sliding layers the window is unused; the reference's default stands in.
        "sliding_window": backbone.sliding_window or 4096,
        "layer_types": list(getattr(backbone, f"{side}_layer_types")),
        "rope_parameters": {layer_type: _rope_entry(*rope[layer_type]) for layer_type in (SLIDING, FULL)},
        "attention_bias": False,
        "attention_dropout": backbone.attention_dropout,
        "dropout_rate": backbone.dropout_rate,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": backbone.final_logit_softcapping,
        "max_position_embeddings": 131_072,
        "initializer_range": backbone.initializer_range,
        "tie_word_embeddings": True,
        "use_cache": True,
        **special_ids,
    }


def _vision_config_for_export(vision_encoder):
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": vision_encoder.hidden_dim,
        "intermediate_size": vision_encoder.intermediate_dim,
        "num_hidden_layers": vision_encoder.num_layers,
        "num_attention_heads": vision_encoder.num_heads,
        "image_size": vision_encoder.image_size,
        "patch_size": vision_encoder.patch_size,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": vision_encoder.layer_norm_epsilon,
        "attention_dropout": vision_encoder.attention_dropout,
        "vision_use_head": False,
    }


def hf_config_from_backbone(backbone, boi_token_id, pad_token_id=0, bos_token_id=2, eos_token_id=1, dtype="float32"):
    """A T5Gemma 2 `config.json` dict, in the spelling `transformers` 5.23 writes, for `backbone`.

    An encoder-only backbone gets the config of a `T5Gemma2Encoder`
    (`model_type` "t5gemma2_encoder"). `backbone_kwargs_from_hf_config`
    reads the result back to the same arguments.

    Raises:
        ValueError: for what `transformers` cannot express: a text-only
            backbone (its T5Gemma 2 always builds the vision tower) or
            attention-logit soft-capping (which it does not apply).
    """
    if backbone.vision_encoder is None:
        raise ValueError(
            "This model has no vision tower (it was loaded with `text_only=True` or built without one), "
            "but transformers' T5Gemma 2 always builds one: its weights would be missing there. "
            "Export a model loaded with its vision tower."
        )
    if not backbone.use_query_key_norm:
        raise ValueError(
            "This model has no query/key RMSNorm (`use_query_key_norm=False`), which transformers' T5Gemma 2 "
            "always applies: the exported model would compute something else."
        )
    if backbone.attn_logit_softcapping is not None:
        raise ValueError(
            "This model soft-caps attention logits, which transformers' T5Gemma 2 (5.23) does not do: the "
            "exported model would compute something else."
        )
    special_ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    vision_encoder = backbone.vision_encoder
    encoder = {
        "model_type": "t5gemma2_encoder",
        "text_config": _text_config_for_export(backbone, "t5gemma2_text", "encoder", special_ids),
        "vision_config": _vision_config_for_export(vision_encoder),
        "mm_tokens_per_image": vision_encoder.mm_tokens_per_image,
        "boi_token_index": boi_token_id,
        "eoi_token_index": backbone.eoi_token_index,
        "image_token_index": backbone.image_token_index,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }
    if backbone.decoder is None:
        return {
            "architectures": ["T5Gemma2Encoder"],
            **encoder,
            "dtype": dtype,
            "transformers_version": TRANSFORMERS_VERSION,
        }
    return {
        "architectures": ["T5Gemma2ForConditionalGeneration"],
        "model_type": "t5gemma2",
        "encoder": encoder,
        "decoder": _text_config_for_export(backbone, "t5gemma2_decoder", "decoder", special_ids),
        "eoi_token_index": backbone.eoi_token_index,
        "image_token_index": backbone.image_token_index,
        "vocab_size": backbone.vocabulary_size,
        "dropout_rate": backbone.dropout_rate,
        "attention_dropout": backbone.attention_dropout,
        "classifier_dropout_rate": 0.0,
        "initializer_range": 0.02,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        **special_ids,
        "dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
    }
