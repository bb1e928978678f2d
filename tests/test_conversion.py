"""Hugging Face checkpoints in: `from_preset` on folders and `hf://` handles, the
conversion tool, presets round trip and errors. No network: hub access is faked."""

import copy
import json
import shutil

import keras
import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from hf_checkpoints import checkpoint_config
from hf_checkpoints import to_earlier_layout
from hf_checkpoints import write_checkpoint
from safetensors import safe_open
from transformers import T5Gemma2ForConditionalGeneration

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import T5Gemma2Tokenizer
from keras_t5gemma.cli import main as command_line
from keras_t5gemma.utils import hub

PROMPT = "A <start_of_image> fox jumped."
# Two bfloat16 implementations each round to 8 significant bits (unit roundoff
# u = 2**-8) after every operation, in different places. Their rounding errors
# random-walk over the L = 6 text layers, and a logit is a D = 32 term dot
# product whose terms each carry them: 2 * u * sqrt(L) * sqrt(D) of the logit
# scale (0.108; measured 0.053).
BFLOAT16_TOLERANCE = 2 * 2**-8 * (6 * 32) ** 0.5


@pytest.fixture(scope="module")
def checkpoints(small_proto, tmp_path_factory):
    """`{layout: (folder, reference model)}` for the layouts a converter must read."""
    config = checkpoint_config()
    folders = {}
    for layout in ("single", "sharded", "earlier"):
        folder = tmp_path_factory.mktemp(layout)
        shards = "40KB" if layout == "sharded" else None
        model = write_checkpoint(folder, config, small_proto, seed=5, max_shard_size=shards)
        if layout == "earlier":
            to_earlier_layout(folder)
        folders[layout] = (folder, model)
    assert len(list(folders["sharded"][0].glob("*.safetensors"))) > 1
    return folders


def _compare_with_reference(seq_2_seq_lm, model, rng, atol=1e-4, rtol=1e-5):
    """Logits of an image prompt through the whole pipeline, against the reference."""
    ours, expected = _image_prompt_logits(seq_2_seq_lm, model, rng)
    return assert_matches_reference(ours, expected, atol=atol, rtol_to_scale=rtol)


def _image_prompt_logits(seq_2_seq_lm, model, rng):
    """`(ours, reference)` float32 logits at the real decoder positions of an image prompt.

    The reference runs in its own dtype (pixels are cast to it).
    """
    image = rng.integers(0, 255, (40, 30, 3), dtype="uint8")
    x, _, _ = seq_2_seq_lm.preprocessor(
        {"encoder_text": [PROMPT], "decoder_text": ["fox"], "images": [[image]]},
        encoder_sequence_length=32,
        decoder_sequence_length=8,
    )
    images = np.asarray(x["images"])
    with torch.no_grad():
        expected = (
            model(
                input_ids=torch.tensor(np.asarray(x["encoder_token_ids"])).long(),
                attention_mask=torch.tensor(np.asarray(x["encoder_padding_mask"])),
                pixel_values=torch.tensor(images[0].transpose(0, 3, 1, 2)).to(model.dtype),
                decoder_input_ids=torch.tensor(np.asarray(x["decoder_token_ids"])).long(),
                decoder_attention_mask=torch.tensor(np.asarray(x["decoder_padding_mask"])),
            )
            .logits.float()
            .numpy()
        )
    logits = keras.ops.convert_to_numpy(keras.ops.cast(seq_2_seq_lm(x), "float32"))
    real = np.asarray(x["decoder_padding_mask"]).astype(bool)
    return logits[real], expected[real]


@pytest.mark.parametrize("layout", ["single", "sharded", "earlier"])
def test_from_preset_on_a_local_folder_matches_reference(checkpoints, layout, rng):
    folder, model = checkpoints[layout]
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder))
    _compare_with_reference(seq_2_seq_lm, model, rng)
    assert seq_2_seq_lm.preprocessor.image_converter.image_size == (28, 28)
    assert seq_2_seq_lm.preprocessor.add_start_token and not seq_2_seq_lm.preprocessor.add_end_token


def test_hf_handle_and_released_name_load_through_the_hub(checkpoints, monkeypatch, rng):
    """`hf://` handles (and released names, which resolve to them) go through `hf_hub_download`."""
    import huggingface_hub

    folder, model = checkpoints["single"]
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        path = folder / filename
        if not path.exists():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hub, "_hub_unreachable", lambda: None)  # the faked hub answers
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_270m_270m")
    assert ("google/t5gemma-2-270m-270m", "config.json") in requested
    _compare_with_reference(seq_2_seq_lm, model, rng)
    tokenizer = T5Gemma2Tokenizer.from_preset("hf://someone/t5gemma-2-tiny")
    assert tokenizer.image_placeholder_token_id == 6


def test_gated_repository_says_how_to_get_access(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    class Forbidden:  # the parts of an HTTP response the error reads
        status_code, headers, request = 403, {}, None

    def gated(repo_id, filename, **kwargs):
        raise GatedRepoError("403 Client Error: access to this model is restricted", response=Forbidden())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    monkeypatch.setattr(hub, "_hub_unreachable", lambda: None)  # the faked hub answers
    with pytest.raises(PermissionError, match="is gated. Accept the Gemma license.*HF_TOKEN"):
        T5Gemma2Backbone.from_preset("hf://google/t5gemma-2-270m-270m")


def test_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown preset `t5gemma2_9b_9b`.*t5gemma2_270m_270m"):
        T5Gemma2Seq2SeqLM.from_preset("t5gemma2_9b_9b")


def _broken_copy(checkpoints, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoints["single"][0], folder)
    return folder


def test_wrong_model_type_is_rejected(checkpoints, tmp_path):
    folder = _broken_copy(checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gemma3"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`model_type` 'gemma3'; keras_t5gemma converts \\['t5gemma', 't5gemma2'\\]"):
        T5Gemma2Backbone.from_preset(str(folder))


def test_missing_weights_are_reported(checkpoints, tmp_path):
    folder = _broken_copy(checkpoints, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither `model.safetensors` nor"):
        T5Gemma2Backbone.from_preset(str(folder))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_weights_are_reported(checkpoints, tmp_path, damage):
    folder = _broken_copy(checkpoints, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="is corrupt"):
        T5Gemma2Backbone.from_preset(str(folder))


def test_config_not_matching_the_weights_is_reported(checkpoints, tmp_path):
    folder = _broken_copy(checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for text in (config["encoder"]["text_config"], config["decoder"]):
        text["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight` has shape .* does not fit"):
        T5Gemma2Backbone.from_preset(str(folder))


def test_bfloat16_conversion(checkpoints, rng):
    folder, model = checkpoints["single"]
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder), dtype="bfloat16")
    kernel = seq_2_seq_lm.backbone.encoder.transformer_layers[0].attention.query_key_value_dense.kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "bfloat16"
    # bf16 weights and compute, against transformers in bf16 on the same weights rounded to bf16.
    reference = copy.deepcopy(model).to(torch.bfloat16)
    _compare_with_reference(seq_2_seq_lm, reference, rng, atol=np.inf, rtol=BFLOAT16_TOLERANCE)


@pytest.fixture(scope="module")
def bfloat16_checkpoint(small_proto, tmp_path_factory):
    """A checkpoint stored in bfloat16 (as released ones are) and `transformers` models loaded from it."""
    folder = tmp_path_factory.mktemp("bfloat16")
    write_checkpoint(folder, checkpoint_config(), small_proto, seed=7).to(torch.bfloat16).save_pretrained(folder)
    with safe_open(folder / "model.safetensors", framework="np") as stored:
        assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"BF16"}
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        models[dtype] = T5Gemma2ForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager"
        ).eval()
    return folder, models


@pytest.mark.backend_smoke
def test_bfloat16_checkpoint_loads_in_float32_like_the_reference(bfloat16_checkpoint, rng):
    folder, models = bfloat16_checkpoint
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder))
    _compare_with_reference(seq_2_seq_lm, models[torch.float32], rng, atol=np.inf, rtol=1e-5)


@pytest.mark.backend_smoke
def test_bfloat16_checkpoint_in_bfloat16_matches_the_reference_in_bfloat16(bfloat16_checkpoint, rng):
    folder, models = bfloat16_checkpoint
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder), dtype="bfloat16")
    assert {keras.backend.standardize_dtype(w.dtype) for w in seq_2_seq_lm.backbone.weights} == {"bfloat16"}
    ours, reference = _image_prompt_logits(seq_2_seq_lm, models[torch.bfloat16], rng)
    assert_matches_reference(ours, reference, atol=np.inf, rtol_to_scale=BFLOAT16_TOLERANCE)
    # And no farther from float32 compute on the same weights than transformers' bfloat16 is.
    _, exact = _image_prompt_logits(seq_2_seq_lm, models[torch.float32], np.random.default_rng(1234))
    assert np.abs(ours - exact).max() <= np.abs(reference - exact).max()


def test_text_only_conversion_skips_the_vision_tower(checkpoints):
    folder, _ = checkpoints["earlier"]
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder), text_only=True)
    assert seq_2_seq_lm.backbone.vision_encoder is None
    assert seq_2_seq_lm.preprocessor.image_converter is None
    assert not any("vision" in w.path for w in seq_2_seq_lm.weights)


def test_tool_converts_verifies_and_round_trips(checkpoints, tmp_path, rng, capsys):
    folder, model = checkpoints["sharded"]
    output = tmp_path / "preset"
    assert command_line(["convert", str(folder), str(output), "--verify"]) == 0
    report = capsys.readouterr().out
    assert "greedy tokens agreeing with transformers: 16/16" in report
    difference = float(report.split("max |logit difference| = ")[1].split()[0])
    assert difference <= 1e-4

    converted = T5Gemma2Seq2SeqLM.from_preset(str(output))
    _compare_with_reference(converted, model, rng)
    direct = T5Gemma2Seq2SeqLM.from_preset(str(folder))
    for a, b in zip(direct.weights, converted.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))

    # A preset saved by this package loads back bit-exactly, tokenizer included.
    again = tmp_path / "again"
    converted.save_to_preset(str(again))
    reloaded = T5Gemma2Seq2SeqLM.from_preset(str(again))
    for a, b in zip(converted.weights, reloaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    text = ["The quick brown fox.", PROMPT]
    np.testing.assert_array_equal(
        converted.preprocessor.generate_preprocess(
            {"encoder_text": text, "images": [[], [np.zeros((8, 8, 3), "uint8")]]}
        )["encoder_token_ids"],
        reloaded.preprocessor.generate_preprocess(
            {"encoder_text": text, "images": [[], [np.zeros((8, 8, 3), "uint8")]]}
        )["encoder_token_ids"],
    )


def test_verify_fails_when_a_weight_is_mapped_wrong(checkpoints, tmp_path, monkeypatch, capsys):
    """A converter bug (one tensor scaled on the way in) makes `convert --verify` exit non-zero."""
    import keras_t5gemma.conversion.convert as conversion

    def load_one_wrong(backbone, keys, read, **kwargs):
        load_weights(backbone, keys, read, **kwargs)
        weight = [w for w in backbone.weights if "decoder" in w.path][-1]
        weight.assign(-weight)

    load_weights = conversion.load_weights
    monkeypatch.setattr(conversion, "load_weights", load_one_wrong)
    folder, _ = checkpoints["single"]
    assert command_line(["convert", str(folder), str(tmp_path / "preset"), "--verify"]) == 2
    assert "MISMATCH" in capsys.readouterr().out


def test_tool_reports_bad_sources(tmp_path, capsys):
    assert command_line(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "Unknown preset" in capsys.readouterr().err


def test_encoder_only_load_skips_the_decoder_and_matches_reference(checkpoints):
    folder, model = checkpoints["single"]
    backbone = T5Gemma2Backbone.from_preset(str(folder), encoder_only=True, text_only=True)
    assert backbone.decoder is None
    ids = np.array([[2, 40, 41, 42, 43, 0]], "int32")
    mask = (ids > 0).astype("int32")
    with torch.no_grad():
        expected = model.model.encoder(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
    ours = backbone({"encoder_token_ids": ids, "encoder_padding_mask": mask})["encoder_sequence_output"]
    real = mask.astype(bool)
    assert_matches_reference(keras.ops.convert_to_numpy(ours)[real], expected.last_hidden_state.numpy()[real])


@pytest.mark.parametrize(
    "single, expected",
    [
        ([{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], (True, False)),
        ([{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<eos>", "type_id": 0}}], (False, True)),
    ],
)
def test_bos_and_eos_follow_the_tokenizer_json_post_processor(checkpoints, tmp_path, single, expected):
    folder = _broken_copy(checkpoints, tmp_path)
    tokenizer_json = {"model": {"type": "BPE"}, "post_processor": {"type": "TemplateProcessing", "single": single}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    preprocessor = T5Gemma2Seq2SeqLM.from_preset(str(folder), load_weights=False).preprocessor
    assert (preprocessor.add_start_token, preprocessor.add_end_token) == expected
