"""T5Gemma (first generation): parity with `transformers`' T5Gemma, generation, training, saving, conversion."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from transformers import T5GemmaConfig
from transformers import T5GemmaForConditionalGeneration

from keras_t5gemma.conversion.t5gemma_config import backbone_from_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import backbone_kwargs_from_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import load_t5gemma_weights
from keras_t5gemma.models.t5gemma_backbone import T5GemmaBackbone

# Unbalanced (the encoder wider, deeper, with more heads than the decoder, as
# 9b-2b), soft-capping on at values the random logits reach, odd windows.
ENCODER = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "sliding_window": 3,
    "query_pre_attn_scalar": 8,
    "attn_logit_softcapping": 5.0,
    "final_logit_softcapping": 3.0,
}
DECODER = {
    **ENCODER,
    "hidden_size": 24,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 12,
}


def t5gemma_config(encoder=None, decoder=None, **top):
    """A `config.json`-style dict (the `rope_theta` spelling of the released files)."""
    encoder = {**ENCODER, "rope_theta": 10_000.0, **(encoder or {})}
    decoder = {**DECODER, "rope_theta": 10_000.0, **(decoder or {})}
    return {"model_type": "t5gemma", "encoder": encoder, "decoder": decoder, **top}


def reference_model(config, seed=0):
    """`T5GemmaForConditionalGeneration` with every parameter random (norms included)."""
    torch.manual_seed(seed)
    hf_config = T5GemmaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    model = T5GemmaForConditionalGeneration(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            std = 0.3 if parameter.ndim == 1 else 0.15
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def converted(model, config, **kwargs):
    backbone = backbone_from_t5gemma_config(config, dtype="float32", **kwargs)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    load_t5gemma_weights(backbone, state.keys(), state.__getitem__)
    return backbone


def right_padded(rng, lengths, length, vocab=300):
    ids = np.zeros((len(lengths), length), "int32")
    mask = np.zeros((len(lengths), length), "int32")
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, vocab, n)
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def pair():
    config = t5gemma_config()
    model = reference_model(config)
    return config, model, converted(model, config)


def test_logits_match_reference_unbalanced_soft_capped_padded(pair, rng):
    config, model, backbone = pair
    encoder_ids, encoder_mask = right_padded(rng, [11, 6], 11)
    decoder_ids, decoder_mask = right_padded(rng, [7, 4], 7)
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor(encoder_ids, dtype=torch.long),
            attention_mask=torch.tensor(encoder_mask),
            decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
            decoder_attention_mask=torch.tensor(decoder_mask),
        )
    outputs = backbone(
        {
            "encoder_token_ids": encoder_ids,
            "encoder_padding_mask": encoder_mask,
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": decoder_mask,
        }
    )
    assert_matches_reference(
        outputs["encoder_sequence_output"], reference.encoder_last_hidden_state.numpy(), mask=encoder_mask
    )
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    # The soft cap bounds the logits; make sure it is exercised.
    assert np.abs(reference.logits.numpy()).max() > 1.5
    assert_matches_reference(logits, reference.logits.numpy(), mask=decoder_mask)


@pytest.mark.parametrize("window", [2, 5])
def test_encoder_windows_match_reference(window, rng):
    """Odd and even windows: the encoder sees `|i - j| <= w`, the decoder `0 <= i - j < w`."""
    config = t5gemma_config(
        encoder={"sliding_window": window, "num_hidden_layers": 2},
        decoder={"sliding_window": window, "num_hidden_layers": 1, "layer_types": ["sliding_attention"]},
    )
    model = reference_model(config, seed=window)
    backbone = converted(model, config)
    encoder_ids, encoder_mask = right_padded(rng, [9, 5], 9)
    decoder_ids, decoder_mask = right_padded(rng, [8, 3], 8)
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor(encoder_ids, dtype=torch.long),
            attention_mask=torch.tensor(encoder_mask),
            decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
            decoder_attention_mask=torch.tensor(decoder_mask),
        ).logits.numpy()
    outputs = backbone(
        {
            "encoder_token_ids": encoder_ids,
            "encoder_padding_mask": encoder_mask,
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": decoder_mask,
        }
    )
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    assert_matches_reference(logits, reference, mask=decoder_mask)


def test_parameter_count_matches_reference(pair):
    _, model, backbone = pair
    # The LM head is the decoder table (tied); `parameters()` counts it once.
    assert backbone.count_params() == sum(p.numel() for p in model.parameters())


def test_both_rope_spellings_give_the_same_arguments():
    released = t5gemma_config(encoder={"rope_theta": 1234.0}, decoder={"rope_theta": 1234.0})
    current = t5gemma_config()
    for side in ("encoder", "decoder"):
        del current[side]["rope_theta"]
        current[side]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert backbone_kwargs_from_t5gemma_config(released) == backbone_kwargs_from_t5gemma_config(current)
    assert backbone_kwargs_from_t5gemma_config(current)["rope_wavelength"] == 1234.0
    # What `transformers` itself writes parses too.
    written = json.loads(T5GemmaConfig(encoder=ENCODER, decoder=DECODER).to_json_string())
    assert backbone_kwargs_from_t5gemma_config(written)["decoder_hidden_dim"] == 24


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "t5gemma2", "encoder": {}, "decoder": {}}, "model_type"),
        (t5gemma_config(decoder={"sliding_window": 7}), "sliding_window"),
        (t5gemma_config(encoder={"hidden_activation": "relu"}), "activation"),
        (t5gemma_config(tie_word_embeddings=False), "Untied"),
        (t5gemma_config(decoder={"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}), "RoPE type"),
    ],
)
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        backbone_kwargs_from_t5gemma_config(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"encoder_num_heads": 3}, "multiple"),
        ({"encoder_head_dim": 7}, "even"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"encoder_layer_types": ["full_attention"]}, "entries"),
        ({"final_logit_soft_cap": -1.0}, "positive"),
    ],
)
def test_bad_backbone_arguments_are_named(overrides, message):
    kwargs = {**backbone_kwargs_from_t5gemma_config(t5gemma_config()), **overrides}
    with pytest.raises(ValueError, match=message):
        T5GemmaBackbone(**kwargs)


def test_checkpoint_mismatch_is_named(pair):
    config, model, _ = pair
    backbone = backbone_from_t5gemma_config(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del state["model.decoder.layers.1.cross_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="cross_attn.k_proj"):
        load_t5gemma_weights(backbone, state.keys(), state.__getitem__)
