"""KerasHub's own T5Gemma 2 presets in: folders written by KerasHub 0.32's `save_to_preset` (text-only and
with vision) give the logits and greedy tokens of KerasHub's model on text prompts; the two embedding
copies; its soft-capping difference; `kaggle://` handles through kagglehub, offline. And back out:
`export_to_keras_hub` of such a model writes KerasHub's weights again, and KerasHub's model from the export
gives our logits on an image prompt. No network."""

import json
import logging

import keras
import keras_hub
import numpy as np
import pytest
from conftest import assert_matches_reference

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2Embedder
from keras_t5gemma import T5Gemma2Seq2SeqLM

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
EOI = 5  # the small vocabulary's <end_of_image>
# Greedy steps; every decoder input has their length plus the start token (one shape: eager passes compile
# each op per shape).
STEPS = 8


def keras_hub_model(proto, vision, seed, **overrides):
    """A tiny KerasHub `T5Gemma2Seq2SeqLM` with every weight random (its norms and vectors start at zero)."""
    vision_encoder = None
    if vision:
        vision_encoder = keras_hub.models.Gemma3VisionEncoder(
            image_size=28,
            patch_size=7,
            num_heads=2,
            hidden_dim=16,
            num_layers=2,
            intermediate_dim=24,
            output_dim=32,
            pool_size=2,
            layer_norm_epsilon=1e-6,
        )
    sizes = {"hidden_dim": 32, "intermediate_dim": 48, "num_layers": 3, "num_attention_heads": 4}
    sizes.update({"num_key_value_heads": 2, "head_dim": 8, "layer_types": LAYER_TYPES})
    backbone = keras_hub.models.T5Gemma2Backbone(
        vocabulary_size=330,
        **{f"{side}_{name}": value for side in ("encoder", "decoder") for name, value in sizes.items()},
        sliding_window=4,
        query_pre_attn_scalar=8,
        global_rope_scaling_factor=8.0,
        vision_encoder=vision_encoder,
        eoi_token_index=EOI,
        **overrides,
    )
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        std = 0.02 if "embedding" in weight.path and weight.ndim == 2 else (0.3 if weight.ndim == 1 else 0.15)
        weight.assign(rng.normal(0, std, weight.shape).astype("float32"))
    # One table and one end-of-image vector, as KerasHub's own conversion writes them.
    backbone.decoder_token_embedding.embeddings.assign(backbone.token_embedding.embeddings)
    if vision:
        backbone.decoder_eoi_embedding.assign(backbone.encoder_eoi_embedding)
    tokenizer = keras_hub.models.T5Gemma2Tokenizer(proto=proto)
    image_converter = keras_hub.layers.T5Gemma2ImageConverter(image_size=(28, 28), scale=1 / 127.5, offset=-1.0)
    preprocessor = keras_hub.models.T5Gemma2Seq2SeqLMPreprocessor(
        tokenizer=tokenizer,
        image_converter=image_converter if vision else None,
        encoder_sequence_length=24,
        decoder_sequence_length=12,
        num_vision_tokens_per_image=4 if vision else None,
    )
    return keras_hub.models.T5Gemma2Seq2SeqLM(backbone=backbone, preprocessor=preprocessor)


@pytest.fixture(scope="module", params=["text_only", "vision"])
def saved(request, small_proto, tmp_path_factory):
    """`(folder, KerasHub model)` for a preset saved by KerasHub."""
    model = keras_hub_model(small_proto, vision=request.param == "vision", seed=11)
    folder = tmp_path_factory.mktemp(f"keras_hub_{request.param}")
    model.save_to_preset(folder)
    return folder, model


def _inputs(rng, keras_hub_vision):
    """Token inputs for our model and KerasHub's; a vision KerasHub model gets its own no-image placeholders."""
    ids = rng.integers(7, 330, (2, 14)).astype("int32")
    ids[:, 0] = 2
    ids[0, 3] = EOI  # the end-of-image token's embedding is used even without an image
    mask = np.ones_like(ids)
    ids[1, 11:], mask[1, 11:] = 0, 0
    decoder_ids = rng.integers(7, 330, (2, STEPS + 1)).astype("int32")
    decoder_ids[:, 0] = 2
    inputs = {
        "encoder_token_ids": ids,
        "encoder_padding_mask": mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": np.ones_like(decoder_ids),
    }
    keras_hub_inputs = dict(inputs)
    if keras_hub_vision:
        # KerasHub's preprocessor feeds text-only prompts to a vision model this way (a no-op).
        keras_hub_inputs["images"] = np.zeros((2, 1, 28, 28, 3), "float32")
        keras_hub_inputs["vision_indices"] = np.zeros((2, 4), "int32")
    return inputs, keras_hub_inputs


def _keras_hub_logits(model, inputs):
    hidden = model.backbone(inputs)["decoder_sequence_output"]
    return keras.ops.convert_to_numpy(model.backbone.decoder_token_embedding(hidden, reverse=True))


def _keras_hub_greedy(model, inputs, steps):
    """KerasHub's greedy tokens, one full forward pass per step.

    Every pass has the final length (each eager pass of a new shape compiles every op again): the tokens
    not generated yet sit after the step's position, masked out, and the decoder is causal.
    """
    tokens = np.zeros((len(inputs["decoder_token_ids"]), steps + 1), "int32")
    tokens[:, 0] = inputs["decoder_token_ids"][:, 0]
    for step in range(steps):
        mask = (np.arange(steps + 1) <= step).astype("int32")[None].repeat(len(tokens), 0)
        logits = _keras_hub_logits(model, {**inputs, "decoder_token_ids": tokens, "decoder_padding_mask": mask})
        tokens[:, step + 1] = logits[:, step].argmax(-1)
    return tokens


def test_keras_hub_preset_gives_keras_hub_logits_and_greedy_tokens(saved, rng):
    folder, keras_hub_lm = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["registered_name"] == "keras_hub>T5Gemma2Backbone"
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder))
    vision = keras_hub_lm.backbone.vision_encoder is not None
    assert (seq_2_seq_lm.backbone.vision_encoder is not None) == vision
    assert (seq_2_seq_lm.preprocessor.image_converter is not None) == vision
    inputs, keras_hub_inputs = _inputs(rng, vision)
    logits = keras.ops.convert_to_numpy(seq_2_seq_lm(inputs))
    assert_matches_reference(logits, _keras_hub_logits(keras_hub_lm, keras_hub_inputs), atol=1e-4, rtol_to_scale=1e-5)

    expected = _keras_hub_greedy(keras_hub_lm, keras_hub_inputs, STEPS)
    on_ids = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    on_ids.compile(sampler="greedy")
    decoder_ids = np.zeros((2, STEPS + 1), "int32")
    decoder_ids[:, 0] = 2
    generated = on_ids.generate(
        {**inputs, "decoder_token_ids": decoder_ids, "decoder_padding_mask": (decoder_ids > 0).astype("int32")},
        stop_token_ids=None,
    )["decoder_token_ids"]
    np.testing.assert_array_equal(generated, expected)
    # The preprocessor keeps KerasHub's settings.
    assert not seq_2_seq_lm.preprocessor.add_start_token and seq_2_seq_lm.preprocessor.add_end_token


def test_an_export_loads_in_keras_hub_with_the_weights_and_our_logits_on_an_image_prompt(saved, tmp_path, rng):
    """KerasHub preset -> ours -> `export_to_keras_hub` -> KerasHub: every variable comes back, and the
    exported model gives our logits (and the original's) with an image in the prompt."""
    folder, keras_hub_lm = saved
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder))
    seq_2_seq_lm.export_to_keras_hub(tmp_path / "exported")
    exported = keras_hub.models.T5Gemma2Seq2SeqLM.from_preset(str(tmp_path / "exported"))
    # Both built the same way, so their variables come in the same order (paths carry per-process counters).
    assert len(exported.backbone.weights) == len(keras_hub_lm.backbone.weights)
    for written, original in zip(exported.backbone.weights, keras_hub_lm.backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(written), keras.ops.convert_to_numpy(original))
    vision = keras_hub_lm.backbone.vision_encoder is not None
    inputs, keras_hub_inputs = _inputs(rng, vision)
    if vision:
        converter = exported.preprocessor.image_converter
        assert (tuple(converter.image_size), converter.scale, converter.offset) == ((28, 28), 1 / 127.5, -1.0)
        assert exported.preprocessor.num_vision_tokens_per_image == 4
        # Four image soft tokens, then the end-of-image token, in each prompt (row 1 is padded from 11).
        inputs["encoder_token_ids"][:, 5:9] = seq_2_seq_lm.backbone.image_token_index
        inputs["encoder_token_ids"][:, 9] = EOI
        inputs["images"] = rng.uniform(-1, 1, (2, 1, 28, 28, 3)).astype("float32")
        keras_hub_inputs = {**inputs, "vision_indices": np.tile(np.arange(5, 9, dtype="int32"), (2, 1))}
    ours = keras.ops.convert_to_numpy(seq_2_seq_lm(inputs))
    assert_matches_reference(ours, _keras_hub_logits(exported, keras_hub_inputs), atol=1e-4, rtol_to_scale=1e-5)
    assert_matches_reference(ours, _keras_hub_logits(keras_hub_lm, keras_hub_inputs), atol=1e-4, rtol_to_scale=1e-5)
    if vision:  # the image matters at this scale
        other = {**keras_hub_inputs, "images": np.zeros_like(inputs["images"])}
        assert np.abs(_keras_hub_logits(exported, other) - ours).max() > 1e-2
        # KerasHub's preprocessor finds images by the `<image_soft_token>` piece (id 6): another id is refused.
        seq_2_seq_lm.backbone.image_token_index = 7
        with pytest.raises(ValueError, match=r"piece is \(id 6 here\), but this model.s image placeholder is id 7"):
            seq_2_seq_lm.export_to_keras_hub(tmp_path / "other_placeholder")


def test_embedder_and_text_only_load_from_a_keras_hub_preset(saved, rng):
    folder, keras_hub_lm = saved
    embedder = T5Gemma2Embedder.from_preset(str(folder))
    assert embedder.backbone.decoder is None
    inputs, keras_hub_inputs = _inputs(rng, keras_hub_lm.backbone.vision_encoder is not None)
    ours = embedder.backbone.encode(inputs["encoder_token_ids"], inputs["encoder_padding_mask"])
    expected = keras_hub_lm.backbone(keras_hub_inputs)["encoder_sequence_output"]
    assert_matches_reference(
        keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(expected), mask=inputs["encoder_padding_mask"]
    )
    text_only = T5Gemma2Seq2SeqLM.from_preset(str(folder), text_only=True)
    assert text_only.backbone.vision_encoder is None and text_only.preprocessor.image_converter is None


def test_differing_embedding_copies_are_reported_and_the_decoders_is_used(small_proto, tmp_path, caplog):
    keras_hub_lm = keras_hub_model(small_proto, vision=False, seed=2)
    table = keras_hub_lm.backbone.decoder_token_embedding.embeddings
    keras_hub_lm.backbone.token_embedding.embeddings.assign(table + 0.5)
    keras_hub_lm.save_to_preset(tmp_path / "preset")
    with caplog.at_level(logging.WARNING, logger="keras_t5gemma.conversion.keras_hub_preset"):
        backbone = T5Gemma2Backbone.from_preset(str(tmp_path / "preset"))
    assert "encoder and decoder embedding tables differ (largest difference 0.5)" in caplog.text
    assert "the decoder's copy" in caplog.text
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(backbone.token_embedding.table.embeddings), keras.ops.convert_to_numpy(table)
    )


def test_soft_capping_is_read_as_the_reference_reads_it(small_proto, tmp_path, rng):
    """KerasHub never applies the final soft-cap (the reference does) and applies the attention one
    (the reference does not): with a final cap of 0.2, our logits are KerasHub's, capped."""
    keras_hub_lm = keras_hub_model(small_proto, vision=False, seed=4, final_logit_softcapping=0.2)
    keras_hub_lm.save_to_preset(tmp_path / "final")
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(tmp_path / "final"))
    inputs, keras_hub_inputs = _inputs(rng, False)
    uncapped = _keras_hub_logits(keras_hub_lm, keras_hub_inputs)
    ours = keras.ops.convert_to_numpy(seq_2_seq_lm(inputs))
    assert_matches_reference(ours, 0.2 * np.tanh(uncapped / 0.2))
    assert np.abs(ours - uncapped).max() > 0.1  # the cap matters at this scale

    keras_hub_model(small_proto, vision=False, seed=4, attn_logit_softcapping=50.0).save_to_preset(
        tmp_path / "attention"
    )
    with pytest.warns(UserWarning, match="`attn_logit_softcapping`, which the reference .* does not apply"):
        T5Gemma2Backbone.from_preset(str(tmp_path / "attention"))


def test_kaggle_handles_go_through_kagglehub(saved, monkeypatch, rng):
    import kagglehub

    folder, keras_hub_lm = saved
    requested = []

    def model_download(handle, path):
        requested.append((handle, path))
        if not (folder / path).exists():
            raise FileNotFoundError(path)
        return str(folder / path)

    monkeypatch.setattr(kagglehub, "model_download", model_download)
    backbone = T5Gemma2Backbone.from_preset("kaggle://keras/t5gemma-2/keras/t5gemma2_tiny/1")
    assert ("keras/t5gemma-2/keras/t5gemma2_tiny/1", "config.json") in requested
    inputs, keras_hub_inputs = _inputs(rng, keras_hub_lm.backbone.vision_encoder is not None)
    hidden = backbone(inputs)["decoder_sequence_output"]
    expected = _keras_hub_logits(keras_hub_lm, keras_hub_inputs)
    assert_matches_reference(keras.ops.convert_to_numpy(backbone.token_embedding.logits(hidden)), expected)


def test_kaggle_without_a_network_says_what_to_do(monkeypatch):
    import kagglehub
    import requests

    def unreachable(handle, path):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "model_download", unreachable)
    with pytest.raises(ConnectionError, match="through kagglehub.*attach the model to a Kaggle notebook"):
        T5Gemma2Seq2SeqLM.from_preset("kaggle://keras/t5gemma-2/keras/t5gemma2_270m_270m/2")
