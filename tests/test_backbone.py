"""Backbone construction, config round trip, errors and mixed precision."""

import warnings

import keras
import numpy as np
import pytest
import torch
from hf_reference import backbone_from_reference
from hf_reference import random_batch
from hf_reference import reference_model
from hf_reference import tiny_config
from transformers.models.t5gemma2 import modeling_t5gemma2

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma.conversion.config import backbone_kwargs_from_hf_config
from keras_t5gemma.layers.attention import grouped_attention

TINY = dict(
    vocabulary_size=300,
    hidden_dim=32,
    intermediate_dim=48,
    num_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_encoder_layers=2,
    num_decoder_layers=2,
    sliding_window=4,
    eoi_token_id=298,
    image_token_id=299,
)


def _inputs(rng, batch=2, encoder_length=7, decoder_length=5):
    encoder_ids, encoder_mask, decoder_ids, decoder_mask = random_batch(
        rng, batch, [encoder_length, 4], [decoder_length, 2], encoder_length, decoder_length
    )
    return {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids.astype("int32"),
        "decoder_padding_mask": decoder_mask.astype("int32"),
    }


def test_config_round_trip_gives_the_same_outputs(rng):
    backbone = T5Gemma2Backbone(**TINY, final_logit_soft_cap=3.0, global_rope_scaling_factor=8.0)
    restored = T5Gemma2Backbone.from_config(backbone.get_config())
    restored.set_weights(backbone.get_weights())
    assert restored.get_config() == backbone.get_config()
    inputs = _inputs(rng)
    for key in ("encoder_sequence_output", "decoder_sequence_output"):
        np.testing.assert_array_equal(backbone(inputs)[key], restored(inputs)[key])


def test_default_layer_types_make_every_sixth_layer_full():
    backbone = T5Gemma2Backbone(**{**TINY, "num_encoder_layers": 12})
    full = [i for i, t in enumerate(backbone.encoder_layer_types) if t == "full_attention"]
    assert full == [5, 11]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 4, "num_key_value_heads": 3}, "`encoder_num_attention_heads` (4) must be a multiple of"),
        ({"encoder_layer_types": ["sliding_attention"]}, "has 1 entries but the stack has 2 layers"),
        ({"decoder_layer_types": ["sliding_attention", "global"]}, "unknown layer types ['global']"),
        ({"head_dim": 7}, "`encoder_head_dim` must be even"),
        ({"sliding_window": 0}, "`sliding_window` must be a positive integer"),
        ({"dropout": 1.0}, "`dropout_rate` must be in [0, 1)"),
    ],
)
def test_bad_config_gives_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=None) as error:
        T5Gemma2Backbone(**{**TINY, **overrides})
    assert message in str(error.value)


def test_hf_config_of_another_model_is_rejected():
    with pytest.raises(ValueError, match="Expected a T5Gemma 2 checkpoint .* got `model_type` 't5gemma'"):
        backbone_kwargs_from_hf_config({"model_type": "t5gemma", "encoder": {}, "decoder": {}})


def test_ignored_attention_soft_cap_warns():
    config = tiny_config(text={"attn_logit_softcapping": 50.0})
    with pytest.warns(UserWarning, match="does not apply"):
        kwargs = backbone_kwargs_from_hf_config(config)
    assert "attention_logit_soft_cap" not in kwargs


def test_attention_soft_cap_matches_reference_attention_math(rng):
    """Our soft-capped grouped attention against the reference's eager attention function."""
    batch, length, keys, heads, kv_heads, size = 2, 5, 6, 4, 2, 8
    query = rng.normal(size=(batch, length, heads, size)).astype("float32") * 3
    key = rng.normal(size=(batch, keys, kv_heads, size)).astype("float32") * 3
    value = rng.normal(size=(batch, keys, kv_heads, size)).astype("float32")
    mask = rng.random((batch, length, keys)) > 0.3
    mask[..., 0] = True
    ours = grouped_attention(query, key, value, mask, scale=0.25, soft_cap=1.5)

    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    additive = torch.where(torch.tensor(mask), 0.0, torch.finfo(torch.float32).min)[:, None]
    reference, _ = modeling_t5gemma2.eager_attention_forward(
        module,
        torch.tensor(query).transpose(1, 2),
        torch.tensor(key).transpose(1, 2),
        torch.tensor(value).transpose(1, 2),
        additive,
        scaling=0.25,
        softcap=1.5,
    )
    np.testing.assert_allclose(np.asarray(ours), reference.numpy(), atol=1e-5)
    uncapped = grouped_attention(query, key, value, mask, scale=0.25)
    assert np.abs(np.asarray(uncapped) - reference.numpy()).max() > 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_bfloat16_stays_close_to_float32(dtype, rng):
    """bf16 logits stay within 5% of the float32 logit scale; norms and softmax run in float32."""
    config = tiny_config()
    model = reference_model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = backbone_from_reference(model, config, dtype="float32")
        half = backbone_from_reference(model, config, dtype=dtype)
    inputs = _inputs(rng)
    expected = np.asarray(full.token_embedding.logits(full(inputs)["decoder_sequence_output"]))
    outputs = half(inputs)["decoder_sequence_output"]
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    logits = np.asarray(keras.ops.cast(half.token_embedding.logits(outputs), "float32"))
    real = inputs["decoder_padding_mask"].astype(bool)
    error = np.abs(logits - expected)[real].max() / np.abs(expected[real]).max()
    assert error < 0.05, error
    norm = half.encoder.transformer_layers[0].pre_attention_norm
    variable_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    assert keras.backend.standardize_dtype(norm.scale.dtype) == variable_dtype


def test_encoder_only_backbone_has_no_decoder_and_the_same_encoder(rng):
    full = T5Gemma2Backbone(**TINY)
    encoder_only = T5Gemma2Backbone(**TINY, encoder_only=True)
    assert encoder_only.decoder is None and "decoder_token_ids" not in encoder_only.input
    assert not any(w.path.startswith("decoder/") for w in encoder_only.weights)
    shared = {w.path: w for w in encoder_only.weights}
    for weight in full.weights:
        if weight.path in shared:
            shared[weight.path].assign(weight)
    inputs = _inputs(rng)
    np.testing.assert_array_equal(
        encoder_only({k: v for k, v in inputs.items() if k.startswith("encoder")})["encoder_sequence_output"],
        full(inputs)["encoder_sequence_output"],
    )
    restored = T5Gemma2Backbone.from_config(encoder_only.get_config())
    assert restored.decoder is None


@pytest.mark.parametrize("key, value", [("encoder_token_ids", 300), ("decoder_token_ids", -1)])
def test_token_ids_outside_the_vocabulary_are_an_error(rng, key, value):
    backbone = T5Gemma2Backbone(**TINY)
    inputs = _inputs(rng)
    inputs[key][0, 0] = value
    with pytest.raises(ValueError, match=f"`{key}` holds ids in .* outside the vocabulary of 300 tokens"):
        backbone(inputs)
