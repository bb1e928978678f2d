"""T5Gemma (first generation): parity with `transformers`' T5Gemma, generation, training, saving, conversion."""

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from hf_checkpoints import T5GEMMA_DECODER
from hf_checkpoints import T5GEMMA_ENCODER
from hf_checkpoints import randomised
from transformers import T5GemmaConfig
from transformers import T5GemmaEncoderModel
from transformers import T5GemmaForConditionalGeneration

from keras_t5gemma.conversion.t5gemma_config import backbone_from_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import backbone_kwargs_from_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import load_t5gemma_weights
from keras_t5gemma.layers import attention as attention_module
from keras_t5gemma.layers.blockwise_attention import blockwise_attention
from keras_t5gemma.layers.blockwise_attention import blockwise_settings
from keras_t5gemma.models.samplers import ArgmaxSampler
from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_embedder import T5GemmaEmbedder
from keras_t5gemma.models.t5gemma.t5gemma_embedder_preprocessor import T5GemmaEmbedderPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_presets import backbone_presets
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm_preprocessor import T5GemmaSeq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_tokenizer import T5GemmaTokenizer
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm

DATA = Path(__file__).parent / "data"
NEW_TOKENS = 8


def t5gemma_config(encoder=None, decoder=None, **top):
    """A `config.json`-style dict (the `rope_theta` spelling of the released files)."""
    encoder = {**T5GEMMA_ENCODER, "rope_theta": 10_000.0, **(encoder or {})}
    decoder = {**T5GEMMA_DECODER, "rope_theta": 10_000.0, **(decoder or {})}
    return {"model_type": "t5gemma", "encoder": encoder, "decoder": decoder, **top}


def reference_model(config, seed=0):
    """`T5GemmaForConditionalGeneration` with every parameter random (norms included)."""
    torch.manual_seed(seed)
    hf_config = T5GemmaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    return randomised(T5GemmaForConditionalGeneration(hf_config), seed)


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


def run_both(model, backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask):
    """`(reference output, our encoder output, our logits)` for one padded batch."""
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor(encoder_ids, dtype=torch.long),
            attention_mask=torch.tensor(encoder_mask),
            decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
            decoder_attention_mask=torch.tensor(decoder_mask),
        )
    # Compiled: one compile costs less than running every op at new shapes one by one.
    outputs = backbone.predict_on_batch(
        {
            "encoder_token_ids": encoder_ids,
            "encoder_padding_mask": encoder_mask,
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": decoder_mask,
        }
    )
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    return reference, outputs["encoder_sequence_output"], logits


@pytest.fixture(scope="module")
def pair():
    config = t5gemma_config()
    model = reference_model(config)
    return config, model, converted(model, config)


def test_logits_match_reference_unbalanced_soft_capped_padded(pair, rng):
    _, model, backbone = pair
    encoder_ids, encoder_mask = right_padded(rng, [11, 6], 11)
    decoder_ids, decoder_mask = right_padded(rng, [7, 4], 7)
    reference, encoder, logits = run_both(model, backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask)
    assert_matches_reference(encoder, reference.encoder_last_hidden_state.numpy(), mask=encoder_mask)
    # The soft cap bounds the logits; make sure it is exercised.
    assert np.abs(reference.logits.numpy()).max() > 1.5
    assert_matches_reference(logits, reference.logits.numpy(), mask=decoder_mask)


def test_blockwise_path_matches_reference(pair, rng, monkeypatch):
    """The shared stack's linear-memory attention serves T5Gemma too: self-attention with soft-capping and
    the separate cross-attention block, forced blockwise at tiny sizes."""
    config, model, backbone = pair
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return blockwise_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "blockwise_attention", counted)
    encoder_ids, encoder_mask = right_padded(rng, [23, 14], 23)
    decoder_ids, decoder_mask = right_padded(rng, [11, 6], 11)
    with blockwise_settings(min_logits=0, block_size=4, step_logits=64):
        reference, encoder, logits = run_both(model, backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask)
    # Encoder self-attention, decoder self- and cross-attention.
    assert len(calls) == config["encoder"]["num_hidden_layers"] + 2 * config["decoder"]["num_hidden_layers"]
    assert_matches_reference(encoder, reference.encoder_last_hidden_state.numpy(), mask=encoder_mask)
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
    reference, _, logits = run_both(model, backbone, encoder_ids, encoder_mask, decoder_ids, decoder_mask)
    assert_matches_reference(logits, reference.logits.numpy(), mask=decoder_mask)


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
    written = json.loads(T5GemmaConfig(encoder=T5GEMMA_ENCODER, decoder=T5GEMMA_DECODER).to_json_string())
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


def test_export_to_transformers_gives_back_every_tensor(pair, seq_2_seq_lm, tmp_path):
    """HF -> here -> HF: the generation model and the encoder alone come back bit for bit, with nothing missing."""
    config, model, backbone = pair
    folder = seq_2_seq_lm.export_to_transformers(tmp_path / "generation")
    written = json.loads((folder / "config.json").read_text())
    assert backbone_kwargs_from_t5gemma_config(written) == backbone_kwargs_from_t5gemma_config(config)
    reloaded, info = T5GemmaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    original = model.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    encoder_folder = T5GemmaEmbedder(backbone).export_to_transformers(tmp_path / "encoder")
    encoder, info = T5GemmaEncoderModel.from_pretrained(encoder_folder, output_loading_info=True)
    assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, original[f"model.{key}"], rtol=0, atol=0, msg=key)


def test_checkpoint_mismatch_is_named(pair):
    config, model, _ = pair
    backbone = backbone_from_t5gemma_config(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del state["model.decoder.layers.1.cross_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="cross_attn.k_proj"):
        load_t5gemma_weights(backbone, state.keys(), state.__getitem__)


# === The task: generation, training, saving ===


@pytest.fixture(scope="module")
def seq_2_seq_lm(pair):
    _, _, backbone = pair
    model = T5GemmaSeq2SeqLM(backbone)
    model.compile(sampler="greedy")
    return model


def _generation_inputs(encoder_ids, encoder_mask):
    batch = len(encoder_ids)
    decoder_ids = np.zeros((batch, NEW_TOKENS + 1), "int32")
    decoder_ids[:, 0] = 2  # <bos>, the decoder start token
    decoder_mask = np.zeros_like(decoder_ids)
    decoder_mask[:, 0] = 1
    return {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": decoder_mask,
    }


def test_greedy_generation_matches_reference(pair, seq_2_seq_lm, rng):
    _, model, _ = pair
    encoder_ids, encoder_mask = right_padded(rng, [10, 6, 3], 10)
    with torch.no_grad():
        expected = model.generate(
            input_ids=torch.tensor(encoder_ids, dtype=torch.long),
            attention_mask=torch.tensor(encoder_mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            decoder_start_token_id=2,
        ).numpy()
    output = seq_2_seq_lm.generate(_generation_inputs(encoder_ids, encoder_mask), stop_token_ids=None)
    np.testing.assert_array_equal(output["decoder_token_ids"], expected)


def _toy_task(rng, count=16):
    encoder_ids, encoder_mask = right_padded(rng, [5] * count, 6)
    labels = np.concatenate([encoder_ids[:, :4], np.ones((count, 1), "int32")], axis=1)  # copy 4 tokens, <eos>
    decoder_ids = np.concatenate([np.full((count, 1), 2, "int32"), labels[:, :-1]], axis=1)
    x = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": np.ones_like(decoder_ids),
    }
    return x, labels


def _tiny_task_model():
    return T5GemmaSeq2SeqLM(backbone_from_t5gemma_config(t5gemma_config()))


def test_fit_lowers_the_loss_and_lora_trains_only_the_adapters(rng):
    x, y = _toy_task(rng)
    model = _tiny_task_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(True))
    history = model.fit(x, y, batch_size=8, epochs=6, verbose=0)
    assert history.history["loss"][-1] < 0.9 * history.history["loss"][0]

    model.backbone.enable_lora(2)
    trainable = {w.path for w in model.trainable_weights}
    # The adapters reach the cross-attention projections too.
    assert trainable and all("lora" in path for path in trainable)
    assert any("cross_attention" in path for path in trainable)
    frozen = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights if "lora" not in w.path}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for weight in model.weights:
        if weight.path in frozen:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), frozen[weight.path])
    lora_b = [w for w in model.weights if "lora_kernel_b" in w.path]
    assert any(np.abs(keras.ops.convert_to_numpy(w)).max() > 0 for w in lora_b)


def test_keras_file_round_trip_is_exact(seq_2_seq_lm, rng, tmp_path):
    path = os.path.join(tmp_path, "model.keras")
    seq_2_seq_lm.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is T5GemmaSeq2SeqLM and type(restored.sampler) is ArgmaxSampler
    x, _ = _toy_task(rng, count=2)
    np.testing.assert_array_equal(seq_2_seq_lm.predict_on_batch(x), restored.predict_on_batch(x))


@pytest.mark.slow
def test_quantized_generation_stays_close(pair, rng):
    """int8 weights (slow on 2 cores: eager calls before and after quantizing)."""
    config, model, _ = pair
    quantized = T5GemmaSeq2SeqLM(converted(model, config))
    x, _ = _toy_task(rng, count=2)
    before = keras.ops.convert_to_numpy(quantized(x))
    quantized.quantize("int8")
    after = keras.ops.convert_to_numpy(quantized(x))
    assert any("int8" in str(w.dtype) for w in quantized.weights)
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()


def test_preset_round_trip_with_tokenizer(seq_2_seq_lm, small_proto, tmp_path):
    tokenizer = T5GemmaTokenizer(small_proto)
    preprocessor = T5GemmaSeq2SeqLMPreprocessor(tokenizer, encoder_sequence_length=24, decoder_sequence_length=10)
    model = T5GemmaSeq2SeqLM(seq_2_seq_lm.backbone, preprocessor)
    model.compile(sampler="greedy")
    expected = model.generate(["The quick brown fox", "Numbers"], max_length=10, stop_token_ids=None)
    model.save_to_preset(str(tmp_path / "preset"))
    restored = T5GemmaSeq2SeqLM.from_preset(str(tmp_path / "preset"))
    restored.compile(sampler="greedy")
    assert type(restored.preprocessor.tokenizer) is T5GemmaTokenizer
    assert restored.generate(["The quick brown fox", "Numbers"], max_length=10, stop_token_ids=None) == expected
    x, y, weights = preprocessor({"encoder_text": ["The fox"], "decoder_text": ["a dog"]})
    # <bos> + prompt for the encoder; <bos> + target for the decoder, target + <eos> as labels.
    assert x["encoder_token_ids"][0, 0] == tokenizer.start_token_id
    assert x["decoder_token_ids"][0, 0] == tokenizer.start_token_id
    assert tokenizer.end_token_id in np.asarray(y[0])
    with pytest.raises(ValueError, match="text-only"):
        T5GemmaSeq2SeqLMPreprocessor(tokenizer, image_converter=object())


def test_hugging_face_folder_loads_through_from_preset(pair, small_proto, rng, tmp_path):
    config, model, backbone = pair
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(small_proto)
    loaded = T5GemmaSeq2SeqLM.from_preset(str(tmp_path))
    with pytest.raises(ValueError, match="T5Gemma \\(first generation\\) checkpoint; load it with `T5GemmaBackbone`"):
        T5Gemma2Backbone.from_preset(str(tmp_path))
    # The command line's `--preset` picks the task of the checkpoint's generation.
    assert type(load_seq_2_seq_lm(str(tmp_path))) is T5GemmaSeq2SeqLM
    assert isinstance(loaded.backbone, T5GemmaBackbone)
    assert isinstance(loaded.preprocessor.tokenizer, T5GemmaTokenizer)
    x, _ = _toy_task(rng, count=2)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(T5GemmaSeq2SeqLM(backbone)(x)), atol=1e-6
    )


def test_embedder_matches_reference_mean_pooled_encoder(pair, small_proto, tmp_path):
    """`T5GemmaEmbedder.from_preset` of a Hugging Face folder: the encoder alone, mean-pooled over real tokens."""
    _, model, _ = pair
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(small_proto)
    embedder = T5GemmaEmbedder.from_preset(str(tmp_path), normalize=False)
    assert embedder.backbone.decoder is None
    assert isinstance(embedder.preprocessor, T5GemmaEmbedderPreprocessor)
    texts = ["The quick brown fox jumps", "Numbers"]
    vectors = embedder.predict(texts)
    inputs = embedder.preprocessor(texts)
    ids = np.asarray(inputs["encoder_token_ids"])
    mask = np.asarray(inputs["encoder_padding_mask"]).astype("float32")
    assert mask[1].sum() < mask[0].sum()  # padding is left out of the mean
    with torch.no_grad():
        hidden = model.get_encoder()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
        ).last_hidden_state.numpy()
    reference = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert vectors.shape == (2, T5GEMMA_ENCODER["hidden_size"])
    assert_matches_reference(vectors, reference)


# === Presets ===


def _reference_count(config):
    """`transformers`' parameter count of a config, on the meta device (no memory)."""
    hf_config = T5GemmaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = T5GemmaForConditionalGeneration(hf_config)
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_32_released_checkpoints():
    sizes = ("s-s", "b-b", "l-l", "ml-ml", "xl-xl", "2b-2b", "9b-2b", "9b-9b")
    handles = {
        f"hf://google/t5gemma-{size}-{objective}{suffix}"
        for size in sizes
        for objective in ("prefixlm", "ul2")
        for suffix in ("", "-it")
    }
    assert {preset["handle"] for preset in backbone_presets.values()} == handles
    assert set(T5GemmaSeq2SeqLM.presets) == set(backbone_presets)


@pytest.mark.parametrize("size", ["s-s", "b-b", "l-l", "xl-xl", "2b-2b", "9b-2b", "9b-9b"])
def test_registry_counts_equal_transformers_counts(size):
    config = json.loads((DATA / f"t5gemma-{size}.json").read_text())
    expected = _reference_count(config)
    key = size.replace("-", "_")
    counts = {preset["params"] for name, preset in backbone_presets.items() if name.startswith(f"t5gemma_{key}_")}
    assert counts == {expected}
    # The bundled config converts (the sizes the registry describes are buildable).
    kwargs = backbone_kwargs_from_t5gemma_config(config)
    assert kwargs["attention_logit_soft_cap"] == 50.0 and kwargs["final_logit_soft_cap"] == 30.0


def test_max_length_is_capped_at_the_released_positions(seq_2_seq_lm):
    # T5Gemma's `max_position_embeddings` is 8192 (T5Gemma 2's 131,072).
    seq_2_seq_lm.check_max_length(8192)
    with pytest.raises(ValueError, match="beyond the decoder's 8,192 positions"):
        seq_2_seq_lm.check_max_length(8193)
