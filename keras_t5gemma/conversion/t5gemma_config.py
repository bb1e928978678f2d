"""Hugging Face T5Gemma (first generation) `config.json` to `T5GemmaBackbone` arguments, and its weight table.

Accepts both RoPE spellings of the reference config: `rope_theta` in each
of `encoder` / `decoder` (the released files) and `rope_parameters`
(`{"rope_type": "default", "rope_theta": ...}`, what `transformers` 5 writes).
"""

import re

from keras_t5gemma.conversion.config import TRANSFORMERS_VERSION
from keras_t5gemma.conversion.quantized_loading import float_weight
from keras_t5gemma.conversion.quantized_loading import quantized_layers
from keras_t5gemma.conversion.weights import LINEAR
from keras_t5gemma.conversion.weights import WeightSpec
from keras_t5gemma.conversion.weights import assign_weights
from keras_t5gemma.conversion.weights import gate_up_specs
from keras_t5gemma.conversion.weights import query_key_value_specs
from keras_t5gemma.conversion.weights import tensor_reader
from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone

# Defaults of the reference `T5GemmaModuleConfig`, used when a field is absent.
_MODULE_DEFAULTS = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
}
_DEFAULT_THETA = 10_000.0
# Fields the encoder and decoder must agree on, because the backbone shares them.
_SHARED_FIELDS = (
    "vocab_size",
    "rms_norm_eps",
    "query_pre_attn_scalar",
    "sliding_window",
    "attn_logit_softcapping",
)


def _get(module_config, name):
    return module_config.get(name, _MODULE_DEFAULTS.get(name))


def _rope_wavelength(module_config):
    """The RoPE base from either spelling; only the default (unscaled) RoPE exists in T5Gemma."""
    parameters = module_config.get("rope_parameters") or module_config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE type `{rope_type}` is not supported; T5Gemma uses `default`.")
    return float(parameters.get("rope_theta", module_config.get("rope_theta", _DEFAULT_THETA)))


def _layer_types(module_config):
    layer_types = module_config.get("layer_types")
    if layer_types is None:
        count = _get(module_config, "num_hidden_layers")
        layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(count)]
    return list(layer_types)


def check_t5gemma_config(config):
    """Raises a clear error unless `config` is a T5Gemma (first generation) `config.json`."""
    model_type = config.get("model_type")
    if model_type != "t5gemma":
        raise ValueError(f'Expected a T5Gemma checkpoint (`model_type` "t5gemma"), got `model_type` {model_type!r}.')
    for section in ("encoder", "decoder"):
        if not isinstance(config.get(section, {}), dict):
            raise ValueError(f"The T5Gemma config's `{section}` section must be a dict.")


def is_encoder_only_config(config):
    """Whether the checkpoint holds the encoder alone (`is_encoder_decoder: false`: `T5GemmaEncoderModel`
    and the encoder-only classifiers)."""
    return not config.get("is_encoder_decoder", True)


def backbone_kwargs_from_t5gemma_config(config):
    """`T5GemmaBackbone` keyword arguments for a T5Gemma `config.json` (a dict)."""
    check_t5gemma_config(config)
    # A missing section takes the reference's defaults, as `T5GemmaConfig` does.
    encoder = config.get("encoder") or {}
    decoder = config.get("decoder") or {}
    for name in _SHARED_FIELDS:
        if _get(encoder, name) != _get(decoder, name):
            raise ValueError(
                f"Encoder and decoder differ in `{name}` ({_get(encoder, name)} vs {_get(decoder, name)}); "
                "this port shares it between them."
            )
    if _rope_wavelength(encoder) != _rope_wavelength(decoder):
        raise ValueError("Encoder and decoder use different RoPE bases; this port shares one.")
    for module_config in (encoder, decoder):
        activation = _get(module_config, "hidden_activation")
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Unsupported activation `{activation}`; T5Gemma uses tanh-approximate GeLU.")
        if _get(module_config, "attention_bias"):
            raise ValueError("Attention biases are not supported; T5Gemma has none.")
    if not config.get("tie_word_embeddings", True) or not decoder.get("tie_word_embeddings", True):
        raise ValueError(
            "Untied word embeddings are not supported: the released T5Gemma models tie the decoder's "
            "embedding table to the output projection."
        )

    def sizes(side, module_config):
        return {
            f"{side}_hidden_dim": _get(module_config, "hidden_size"),
            f"{side}_intermediate_dim": _get(module_config, "intermediate_size"),
            f"{side}_num_layers": _get(module_config, "num_hidden_layers"),
            f"{side}_num_heads": _get(module_config, "num_attention_heads"),
            f"{side}_num_key_value_heads": _get(module_config, "num_key_value_heads"),
            f"{side}_head_dim": _get(module_config, "head_dim"),
            f"{side}_layer_types": _layer_types(module_config),
        }

    return {
        "vocabulary_size": _get(decoder, "vocab_size"),
        **sizes("encoder", encoder),
        **sizes("decoder", decoder),
        "sliding_window": _get(decoder, "sliding_window"),
        "query_pre_attn_scalar": _get(decoder, "query_pre_attn_scalar"),
        "rope_wavelength": _rope_wavelength(decoder),
        "layer_norm_epsilon": _get(decoder, "rms_norm_eps"),
        "attention_logit_soft_cap": _get(decoder, "attn_logit_softcapping"),
        "final_logit_soft_cap": _get(decoder, "final_logit_softcapping"),
        "dropout": float(config.get("dropout_rate", 0.0)),
        "attention_dropout": float(config.get("attention_dropout", 0.0)),
    }


def backbone_from_t5gemma_config(config, encoder_only=False, dtype=None, cls=T5GemmaBackbone, remat=False):
    """A `cls` backbone (random weights) for a T5Gemma `config.json` dict."""
    return cls(**backbone_kwargs_from_t5gemma_config(config), encoder_only=encoder_only, remat=remat, dtype=dtype)


def _attention_specs(attention, prefix):
    if attention.fused:
        yield from query_key_value_specs(attention, prefix)
    else:  # a cross-attention block
        yield WeightSpec(float_weight(attention.query_dense), f"{prefix}.q_proj.weight", LINEAR)
        yield WeightSpec(float_weight(attention.key_dense), f"{prefix}.k_proj.weight", LINEAR)
        yield WeightSpec(float_weight(attention.value_dense), f"{prefix}.v_proj.weight", LINEAR)
    yield WeightSpec(float_weight(attention.output_dense), f"{prefix}.o_proj.weight", LINEAR, input_axes=2)


def _layer_specs(layer, prefix):
    yield WeightSpec(layer.pre_attention_norm.scale, f"{prefix}.pre_self_attn_layernorm.weight")
    yield WeightSpec(layer.post_attention_norm.scale, f"{prefix}.post_self_attn_layernorm.weight")
    yield from _attention_specs(layer.attention, f"{prefix}.self_attn")
    if layer.cross_attention is not None:
        yield WeightSpec(layer.pre_cross_attention_norm.scale, f"{prefix}.pre_cross_attn_layernorm.weight")
        yield WeightSpec(layer.post_cross_attention_norm.scale, f"{prefix}.post_cross_attn_layernorm.weight")
        yield from _attention_specs(layer.cross_attention, f"{prefix}.cross_attn")
    yield WeightSpec(layer.pre_feedforward_norm.scale, f"{prefix}.pre_feedforward_layernorm.weight")
    yield WeightSpec(layer.post_feedforward_norm.scale, f"{prefix}.post_feedforward_layernorm.weight")
    yield from gate_up_specs(layer.feedforward, f"{prefix}.mlp")
    yield WeightSpec(float_weight(layer.feedforward.down_dense), f"{prefix}.mlp.down_proj.weight", LINEAR)


def t5gemma_weight_specs(backbone):
    """Every `T5GemmaBackbone` variable with the checkpoint key that fills it."""
    encoder_table = float_weight(backbone.encoder_token_embedding.table, "embeddings")
    yield WeightSpec(encoder_table, "model.encoder.embed_tokens.weight")
    if backbone.token_embedding is not None:
        decoder_table = float_weight(backbone.token_embedding.table, "embeddings")
        yield WeightSpec(decoder_table, "model.decoder.embed_tokens.weight")
    for side, stack in (("encoder", backbone.encoder), ("decoder", backbone.decoder)):
        if stack is None:
            continue
        for i, layer in enumerate(stack.transformer_layers):
            yield from _layer_specs(layer, f"model.{side}.layers.{i}")
        yield WeightSpec(stack.final_norm.scale, f"model.{side}.norm.weight")


# The output projection is the decoder's table, tied; a classifier's head is read by `load_classifier_head`.
_TIED = re.compile(r"^(lm_head\.out_proj\.weight|score\.out_proj\.(weight|bias))$")
_DECODER = re.compile(r"^model\.decoder\.")
# `T5GemmaEncoderModel` stores the encoder at the top level (`encoder.layers.N...`).
_TOP_LEVEL_ENCODER = "encoder."


def load_t5gemma_weights(backbone, keys, reader, progress=None):
    """Assigns every `T5GemmaBackbone` variable from a checkpoint (see `weights.assign_weights`).

    An encoder-only backbone reads only the encoder's tensors, from a full
    checkpoint or an encoder-only one (`T5GemmaEncoderModel` keys included).
    `reader` is a `weights.TensorReader` or a callable key -> array.
    """
    left_out = [_TIED] if backbone.decoder is not None else [_TIED, _DECODER]
    stored = {f"model.{key}" if key.startswith(_TOP_LEVEL_ENCODER) else key: key for key in keys}
    assign_weights(
        list(t5gemma_weight_specs(backbone)),
        stored,
        tensor_reader(reader).renamed(lambda key: stored.get(key, key)),
        left_out,
        progress=progress,
        model_name="a T5Gemma checkpoint matching its config",
        quantized=quantized_layers(backbone),
    )


# The released configs' `max_position_embeddings` (the decoder's generation limit; RoPE has no table).
_MAX_POSITIONS = 8192


def hf_config_from_t5gemma_backbone(
    backbone, encoder_decoder=True, pad_token_id=0, bos_token_id=2, eos_token_id=1, dtype="float32"
):
    """A T5Gemma `config.json` dict, in the spelling `transformers` 5.23 writes, for `backbone`.

    `encoder_decoder=False` writes `is_encoder_decoder: false` (a
    `T5GemmaEncoderModel` or an encoder-only classifier); the decoder
    section keeps the backbone's decoder sizes even where no decoder is
    built. `backbone_kwargs_from_t5gemma_config` reads the result back to the
    same arguments. The caller adds `architectures` and any head entries.
    """
    special_ids = {"pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "bos_token_id": bos_token_id}

    def module(side):
        return {
            "model_type": "t5_gemma_module",
            "vocab_size": backbone.vocabulary_size,
            "hidden_size": getattr(backbone, f"{side}_hidden_dim"),
            "intermediate_size": getattr(backbone, f"{side}_intermediate_dim"),
            "num_hidden_layers": getattr(backbone, f"{side}_num_layers"),
            "num_attention_heads": getattr(backbone, f"{side}_num_heads"),
            "num_key_value_heads": getattr(backbone, f"{side}_num_key_value_heads"),
            "head_dim": getattr(backbone, f"{side}_head_dim"),
            "layer_types": list(getattr(backbone, f"{side}_layer_types")),
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": _MAX_POSITIONS,
            "initializer_range": 0.02,
            "rms_norm_eps": backbone.layer_norm_epsilon,
            "use_cache": True,
            **special_ids,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": backbone.rope_wavelength, "rope_type": "default"},
            "attention_bias": False,
            "attention_dropout": backbone.attention_dropout,
            "query_pre_attn_scalar": backbone.query_pre_attn_scalar,
            "sliding_window": backbone.sliding_window,
            "final_logit_softcapping": backbone.final_logit_soft_cap,
            "attn_logit_softcapping": backbone.attention_logit_soft_cap,
            "is_decoder": side == "decoder",
            "dropout_rate": backbone.dropout,
        }

    decoder = {**module("decoder"), "cross_attention_hidden_size": backbone.encoder_hidden_dim}
    return {
        "model_type": "t5gemma",
        "encoder": module("encoder"),
        "decoder": decoder,
        "is_encoder_decoder": encoder_decoder,
        "dropout_rate": backbone.dropout,
        "classifier_dropout_rate": 0.0,
        "attention_dropout": backbone.attention_dropout,
        "tie_word_embeddings": True,
        "vocab_size": backbone.vocabulary_size,
        "initializer_range": 0.02,
        **special_ids,
        "dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
    }
