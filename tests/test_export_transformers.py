"""Models out to `transformers`: bit-for-bit round trips, parity after `fit` and LoRA, the demo
preset answering the same, what `from_pretrained` logs, refusals and the output folder."""

import io
import json
import logging
import warnings

import keras
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_matches_reference
from hf_checkpoints import checkpoint_config
from hf_checkpoints import write_checkpoint
from safetensors.numpy import load_file
from transformers import AutoModel
from transformers import AutoProcessor
from transformers import AutoTokenizer
from transformers import T5Gemma2ForConditionalGeneration

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2Embedder
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import demo
from keras_t5gemma.cli import main as command_line
from keras_t5gemma.conversion.config import backbone_kwargs_from_hf_config
from keras_t5gemma.conversion.config import vision_encoder_kwargs_from_hf_config

NEW_TOKENS = 12
TEXTS = ["A fox jumped over 12345 dogs.", "def add(a, b):\n    return a + b", "  two  spaces\tand é"]


@pytest.fixture(scope="module")
def checkpoint(small_proto, tmp_path_factory):
    """A tiny float32 checkpoint as `transformers` writes it, and the model it came from."""
    folder = tmp_path_factory.mktemp("hf_float32")
    model = write_checkpoint(folder, checkpoint_config(), small_proto, seed=3)
    return folder, model


@pytest.fixture(scope="module")
def seq_2_seq_lm(checkpoint):
    return T5Gemma2Seq2SeqLM.from_preset(str(checkpoint[0]))


def _tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def _load_in_transformers(folder):
    """The model and processor from `folder`, and every message `transformers` logged while loading."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    transformers.logging.set_verbosity_info()
    transformers.logging.add_handler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = T5Gemma2ForConditionalGeneration.from_pretrained(
                folder, dtype=torch.float32, output_loading_info=True
            )
            processor = AutoProcessor.from_pretrained(folder)
    finally:
        transformers.logging.remove_handler(handler)
        transformers.logging.set_verbosity_warning()
    log = stream.getvalue() + "\n".join(str(w.message) for w in caught)
    return model.eval(), processor, info, log


def _assert_loads_cleanly(info, log):
    assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for phrase in ("missing", "unexpected", "newly initialized", "not used when initializing", "mismatch"):
        assert phrase not in log.lower(), log


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_keras_to_hf_gives_back_every_tensor_bit_for_bit(checkpoint, tmp_path, dtype):
    source, model = checkpoint
    if dtype == "bfloat16":
        source = tmp_path / "hf_bfloat16"
        model_copy = T5Gemma2ForConditionalGeneration.from_pretrained(checkpoint[0], dtype=torch.bfloat16)
        model_copy.save_pretrained(source)
        (source / "tokenizer.model").write_bytes((checkpoint[0] / "tokenizer.model").read_bytes())
    keras_model = T5Gemma2Seq2SeqLM.from_preset(str(source), dtype=dtype)
    output = keras_model.export_to_transformers(tmp_path / "exported")

    original, exported = _tensors(source), _tensors(output)
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert exported[key].shape == tensor.shape, key
        assert exported[key].tobytes() == tensor.tobytes(), key
    if dtype == "bfloat16":
        assert original["model.encoder.norm.weight"].dtype == ml_dtypes.bfloat16
    written, read = (json.loads((folder / "config.json").read_text()) for folder in (output, source))
    ours, theirs = backbone_kwargs_from_hf_config(written), backbone_kwargs_from_hf_config(read)
    mm_tokens = ours["mm_tokens_per_image"]
    vision = [
        vision_encoder_kwargs_from_hf_config(kwargs.pop("vision_config"), mm_tokens, 32) for kwargs in (ours, theirs)
    ]
    assert ours == theirs and vision[0] == vision[1]
    # The config reads back in transformers to the same settings it saved.
    expected = transformers.T5Gemma2Config.from_pretrained(source).to_dict()
    actual = transformers.T5Gemma2Config.from_pretrained(output).to_dict()
    for config in (expected, actual):
        # Where the file was, and the sections' dtype (set by `from_pretrained(dtype=)`; the top level has it).
        config.pop("_name_or_path", None)
        for section in (config["encoder"]["text_config"], config["encoder"]["vision_config"]):
            section.pop("_name_or_path", None)
        for section in (config["encoder"], config["decoder"]):
            section.pop("dtype", None)
    assert actual == expected


def test_export_loads_in_transformers_without_key_warnings_and_tokenizes_the_same(seq_2_seq_lm, tmp_path):
    output = seq_2_seq_lm.export_to_transformers(tmp_path / "exported", max_shard_size="40KB")
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        path.name for path in output.iterdir()
    }
    _, processor, info, log = _load_in_transformers(output)
    _assert_loads_cleanly(info, log)
    assert type(processor).__name__ == "Gemma3Processor"
    assert processor.image_processor.size == {"height": 28, "width": 28}
    tokenizer = seq_2_seq_lm.preprocessor.tokenizer
    for text in TEXTS + ["<start_of_image> <end_of_image>"]:
        ours = [tokenizer.start_token_id] + list(np.asarray(tokenizer(text)))
        assert processor.tokenizer(text).input_ids == ours, text
    for text in TEXTS:
        ours = list(np.asarray(tokenizer(text)))
        assert processor.tokenizer.decode(ours) == tokenizer.detokenize([ours])[0] == text


def _ids_batch(rng, vocabulary=330):
    """Right-padded prompts of ordinary tokens (ids 7 and up: the image ids are 4-6)."""
    ids = rng.integers(7, vocabulary, (2, 10)).astype("int32")
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0
    return ids, mask


def _compare_with_transformers(seq_2_seq_lm, folder, rng):
    """Logits (with an image) and greedy tokens of `seq_2_seq_lm` and of `folder` loaded in transformers."""
    model, _, info, log = _load_in_transformers(folder)
    _assert_loads_cleanly(info, log)
    image = rng.integers(0, 255, (30, 40, 3), dtype="uint8")
    x, _, _ = seq_2_seq_lm.preprocessor(
        {"encoder_text": ["A <start_of_image> fox"], "decoder_text": ["fox jumped"], "images": [[image]]},
        encoder_sequence_length=24,
        decoder_sequence_length=8,
    )
    with torch.no_grad():
        expected = model(
            input_ids=torch.tensor(np.asarray(x["encoder_token_ids"])).long(),
            attention_mask=torch.tensor(np.asarray(x["encoder_padding_mask"])),
            pixel_values=torch.tensor(np.asarray(x["images"])[0].transpose(0, 3, 1, 2)),
            decoder_input_ids=torch.tensor(np.asarray(x["decoder_token_ids"])).long(),
            decoder_attention_mask=torch.tensor(np.asarray(x["decoder_padding_mask"])),
        ).logits.numpy()
    logits = keras.ops.convert_to_numpy(seq_2_seq_lm(x))
    real = np.asarray(x["decoder_padding_mask"]).astype(bool)
    assert_matches_reference(logits[real], expected[real], atol=1e-3, rtol_to_scale=1e-5)

    ids, mask = _ids_batch(rng)
    with torch.no_grad():
        reference_tokens = model.generate(
            input_ids=torch.tensor(ids).long(),
            attention_mask=torch.tensor(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        ).numpy()
    on_ids = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    on_ids.compile(sampler="greedy")
    decoder_ids = np.zeros((2, NEW_TOKENS + 1), "int32")
    decoder_ids[:, 0] = 2
    tokens = on_ids.generate(
        {
            "encoder_token_ids": ids,
            "encoder_padding_mask": mask,
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": (decoder_ids > 0).astype("int32"),
        },
        stop_token_ids=None,
    )["decoder_token_ids"]
    np.testing.assert_array_equal(tokens, reference_tokens)


@pytest.mark.parametrize("lora", [False, True], ids=["fit", "lora_fit"])
def test_after_fit_transformers_computes_what_we_compute(checkpoint, tmp_path, rng, lora):
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(checkpoint[0]))
    if lora:
        seq_2_seq_lm.backbone.enable_lora(2)
    seq_2_seq_lm.preprocessor.encoder_sequence_length = 16
    seq_2_seq_lm.preprocessor.decoder_sequence_length = 8
    seq_2_seq_lm.compile(optimizer=keras.optimizers.Adam(0.05))
    before = keras.ops.convert_to_numpy(
        seq_2_seq_lm.backbone.decoder.transformer_layers[0].attention.query_key_value_dense.kernel
    )
    seq_2_seq_lm.fit({"encoder_text": ["fox jumped", "a b"], "decoder_text": ["dog", "c"]}, batch_size=2, verbose=0)
    after = keras.ops.convert_to_numpy(
        seq_2_seq_lm.backbone.decoder.transformer_layers[0].attention.query_key_value_dense.kernel
    )
    assert np.abs(after - before).max() > 1e-3  # the step (or the adapter) moved the weights
    _compare_with_transformers(seq_2_seq_lm, seq_2_seq_lm.export_to_transformers(tmp_path / "exported"), rng)


def test_the_demo_preset_answers_its_held_out_prompts_the_same_in_transformers(tmp_path):
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(sampler="greedy")
    output = seq_2_seq_lm.export_to_transformers(tmp_path / "digits")
    model, processor, info, log = _load_in_transformers(output)
    _assert_loads_cleanly(info, log)
    examples = demo.make_examples(["reverse", "sort", "color"], count=12, seed=4, held_out=True)
    ours = demo.generate_answers(seq_2_seq_lm, examples)
    tokenizer = processor.tokenizer
    theirs = []
    for example in examples:
        if example.image is None:
            # The text goes through the exported tokenizer.
            inputs = tokenizer(example.prompt, return_tensors="pt")
        else:
            # Our prompt layout around the image, with pixels from the exported image processor.
            x = seq_2_seq_lm.preprocessor.generate_preprocess(
                {"encoder_text": [example.prompt], "images": [[example.image]]}
            )
            pixels = processor.image_processor(example.image, return_tensors="pt").pixel_values
            inputs = {
                "input_ids": torch.tensor(np.asarray(x["encoder_token_ids"])).long(),
                "attention_mask": torch.tensor(np.asarray(x["encoder_padding_mask"])),
                "pixel_values": pixels,
            }
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=15, do_sample=False)
        theirs.append(tokenizer.decode(tokens[0], skip_special_tokens=True).strip())
    assert theirs == ours
    assert demo.exact_match(ours, examples) > 0.5


def test_embedder_exports_a_transformers_encoder(seq_2_seq_lm, tmp_path, rng):
    embedder = T5Gemma2Embedder(seq_2_seq_lm.backbone)
    output = embedder.export_to_transformers(tmp_path / "encoder")
    assert not any(key.startswith("model.") for key in _tensors(output))
    encoder = AutoModel.from_pretrained(output, dtype=torch.float32).eval()
    assert type(encoder).__name__ == "T5Gemma2Encoder"
    ids, mask = _ids_batch(rng)
    with torch.no_grad():
        expected = encoder(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).last_hidden_state
    ours = seq_2_seq_lm.backbone.encode(ids, mask)
    assert_matches_reference(keras.ops.convert_to_numpy(ours), expected.numpy(), mask=mask)


def _tiny_backbone(**kwargs):
    return T5Gemma2Backbone.from_preset("t5gemma2_tiny_digits", **kwargs)


def test_an_int8_model_is_refused_with_a_clear_message(tmp_path):
    backbone = _tiny_backbone()
    # One int8 layer is enough to be refused (quantizing the whole model took a minute of the suite).
    backbone.token_embedding.table.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized \(int8\).*before calling `quantize\(\)`"):
        backbone.export_to_transformers(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_text_only_model_is_refused(checkpoint, tmp_path):
    backbone = T5Gemma2Backbone.from_preset(str(checkpoint[0]), text_only=True)
    with pytest.raises(ValueError, match="no vision tower.*always builds one"):
        backbone.export_to_transformers(tmp_path / "out")


def test_the_folder_is_never_overwritten_without_asking(seq_2_seq_lm, tmp_path, monkeypatch):
    from keras_t5gemma.conversion import transformers_export

    backbone = seq_2_seq_lm.backbone
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; pass `overwrite=True`"):
        backbone.export_to_transformers(folder)
    with pytest.raises(ValueError, match="holds files an export does not write.*notes.txt"):
        backbone.export_to_transformers(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"

    first = backbone.export_to_transformers(tmp_path / "export", max_shard_size="40KB")
    assert (first / "model.safetensors.index.json").exists()
    backbone.export_to_transformers(first, overwrite=True)  # one file now: the shards go
    assert sorted(p.name for p in first.glob("*.safetensors")) == ["model.safetensors"]
    assert not (first / "model.safetensors.index.json").exists()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers_export, "_write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        backbone.export_to_transformers(tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]  # no partial folder


def test_bad_sizes_and_dtypes_are_named(seq_2_seq_lm, tmp_path):
    with pytest.raises(ValueError, match="Cannot read the size '2 parsecs'"):
        seq_2_seq_lm.export_to_transformers(tmp_path / "out", max_shard_size="2 parsecs")
    with pytest.raises(ValueError, match="`dtype` must be one of.*'int8'"):
        seq_2_seq_lm.export_to_transformers(tmp_path / "out", dtype="int8")


def test_command_line_exports_bfloat16_shards(capsys, tmp_path):
    output = tmp_path / "digits_hf"
    argv = ["export", str(output), "--format", "transformers", "--dtype", "bfloat16", "--max-shard-size", "500KB"]
    assert command_line(argv) == 0
    assert "transformers" in capsys.readouterr().out
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = _tensors(output)
    assert {tensor.dtype for tensor in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(output)("sort: 3 1").input_ids[0] == 2
    assert command_line(argv) == 2  # the folder is there now
    assert "not empty" in capsys.readouterr().err
