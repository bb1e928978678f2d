"""The text backbone against `transformers` on tiny random models."""

import keras
import numpy as np
import pytest
from conftest import assert_matches_reference
from hf_reference import backbone_from_reference
from hf_reference import random_batch
from hf_reference import reference_model
from hf_reference import reference_outputs
from hf_reference import tiny_config

CONFIGS = {
    # Sequence longer than the window, GQA ratio 2, linear RoPE on full layers.
    "gqa2_window4": tiny_config(),
    # Odd window, no grouping, RoPE without scaling.
    "mha_window5": tiny_config(
        text={
            "num_key_value_heads": 4,
            "sliding_window": 5,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        }
    ),
    # One key/value head for four query heads, soft-capping on, odd window 3.
    "gqa4_softcap_window3": tiny_config(
        text={
            "num_key_value_heads": 1,
            "sliding_window": 3,
            "final_logit_softcapping": 2.0,
            "attn_logit_softcapping": 1.0,
            "query_pre_attn_scalar": 4,
        }
    ),
    # Encoder deeper than the decoder, all-sliding decoder, window 1.
    "uneven_depth_window1": tiny_config(
        text={"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 1},
        decoder={"num_hidden_layers": 2, "layer_types": ["sliding_attention", "sliding_attention"]},
    ),
    # Asymmetric stacks (KerasHub's `encoder_*`/`decoder_*`): the decoder has other MLP width, heads,
    # key/value heads, head size, depth, layer types and sliding RoPE base; widths stay equal (the
    # reference refuses unequal ones).
    "asymmetric": tiny_config(
        text={"intermediate_size": 64},
        decoder={
            "intermediate_size": 40,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "layer_types": ["full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            },
        },
    ),
}
SMOKE = {"gqa2_window4", "gqa4_softcap_window3"}


def _parametrize():
    return [pytest.param(name, marks=[pytest.mark.backend_smoke] if name in SMOKE else [], id=name) for name in CONFIGS]


def _run(backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask):
    # Compiled: one compile costs less than running every op at new shapes one by one.
    outputs = backbone.predict_on_batch(
        {
            "encoder_token_ids": encoder_ids.astype("int32"),
            "encoder_padding_mask": encoder_mask.astype("int32"),
            "decoder_token_ids": decoder_ids.astype("int32"),
            "decoder_padding_mask": decoder_mask.astype("int32"),
        }
    )
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    return outputs["encoder_sequence_output"], keras.ops.convert_to_numpy(logits)


@pytest.fixture(scope="module", params=_parametrize())
def pair(request):
    import warnings

    config = CONFIGS[request.param]
    model = reference_model(config, seed=len(request.param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = backbone_from_reference(model, config)
    return model, backbone


def test_encoder_and_logits_match_reference(pair, rng):
    model, backbone = pair
    batch = random_batch(rng, 3, [12, 9, 4], [7, 5, 2], encoder_length=12, decoder_length=7)
    reference_encoder, reference_logits = reference_outputs(model, *batch)
    encoder, logits = _run(backbone, *batch)
    encoder_mask, _, _, decoder_mask = batch[1], None, None, batch[3]
    assert_matches_reference(encoder, reference_encoder, encoder_mask[..., None].repeat(encoder.shape[-1], -1))
    assert_matches_reference(logits, reference_logits, decoder_mask[..., None].repeat(logits.shape[-1], -1))


def test_padding_does_not_change_real_positions(pair, rng):
    _, backbone = pair
    encoder_ids, encoder_mask, decoder_ids, decoder_mask = random_batch(
        rng, 2, [10, 5], [6, 3], encoder_length=10, decoder_length=6
    )
    batched_encoder, batched_logits = _run(backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask)
    n, m = 5, 3
    alone_encoder, alone_logits = _run(
        backbone, encoder_ids[1:, :n], encoder_mask[1:, :n], decoder_ids[1:, :m], decoder_mask[1:, :m]
    )
    np.testing.assert_allclose(batched_encoder[1, :n], alone_encoder[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(batched_logits[1, :m], alone_logits[0], atol=1e-5, rtol=1e-5)
