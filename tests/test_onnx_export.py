"""ONNX export (`keras_t5gemma.export`) and its Keras-free runtime (`t5gemma_onnx`).

Exports are shared per module: the bundled demo preset (float32 and int8) and a
tiny random vision checkpoint whose sliding window (4) is shorter than the
sequences, so the windowed masks are exercised.
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from conftest import assert_matches_reference
from hf_reference import BOI
from hf_reference import EOI
from hf_reference import IMAGE
from hf_reference import backbone_from_reference
from hf_reference import reference_model
from hf_reference import reference_outputs
from hf_reference import tiny_config
from PIL import Image

from keras_t5gemma import demo as demo_tasks
from keras_t5gemma.cli import main
from keras_t5gemma.export import export_onnx
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder_preprocessor import T5Gemma2EmbedderPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from t5gemma_onnx import OnnxSeq2SeqLM

DEMO = "t5gemma2_tiny_digits"
DEMO_MAX_LENGTH = 16
NEW_TOKENS = 12
# Held-out demo prompts for the int8 agreement (ONNX only, so cheap).
AGREEMENT_EXAMPLES = 300


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model, its float32 export and a runtime on it."""
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(DEMO)
    seq_2_seq_lm.compile(sampler="greedy")
    folder = tmp_path_factory.mktemp("demo_onnx")
    settings = export_onnx(seq_2_seq_lm, folder, max_decode_length=DEMO_MAX_LENGTH)
    return seq_2_seq_lm, folder, settings, OnnxSeq2SeqLM(folder)


@pytest.fixture(scope="module")
def demo_int8(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_onnx_int8")
    export_onnx(demo[0], folder, max_decode_length=DEMO_MAX_LENGTH, quantize="int8")
    return folder, OnnxSeq2SeqLM(folder)


@pytest.fixture(scope="module")
def random_vision(tmp_path_factory):
    """A tiny random vision checkpoint in `transformers` and Keras, and its export (no tokenizer).

    Its decoder differs from its encoder in heads, key/value heads, head size,
    MLP width and depth, so the graphs take each stack's own sizes.
    """
    decoder = {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "layer_types": ["full_attention", "sliding_attention"],
    }
    config = tiny_config(mm_tokens_per_image=4, decoder=decoder)
    model = reference_model(config, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = backbone_from_reference(model, config, text_only=False)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    seq_2_seq_lm.compile(sampler="greedy")
    folder = tmp_path_factory.mktemp("random_onnx")
    export_onnx(seq_2_seq_lm, folder, max_decode_length=NEW_TOKENS + 1)
    return model, seq_2_seq_lm, OnnxSeq2SeqLM(folder)


def _encoder_batch(rng, lengths, images_per_sample, mm_tokens=4):
    """Right-padded encoder ids with image blocks, as in `test_seq_2_seq_lm`."""
    rows = []
    for n, images in zip(lengths, images_per_sample):
        ids = [2] + list(rng.integers(3, 290, n - 1))
        for _ in range(images):
            ids += [BOI] + [IMAGE] * mm_tokens + [EOI]
        rows.append(ids)
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], "int64")
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], "int64")
    return ids, mask


def _decoder_logits(runtime, encoder_ids, encoder_mask, images, decoder_ids, step_by_step):
    """Decoder logits from the ONNX graphs: one prefill chunk, or one token per step."""
    encoder = runtime._session("encoder")
    feeds = runtime._encoder_feeds(encoder_ids, encoder_mask, images)
    encoded = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, feeds)))
    settings = runtime.settings
    shape = (len(encoder_ids), settings["max_decode_length"], settings["num_key_value_heads"], settings["head_dim"])
    decoder_feeds = {"encoder_padding_mask": feeds["encoder_padding_mask"]}
    decoder = runtime._session("decoder")
    # float16 caches in the float16 graph sets (`test_onnx_precisions`).
    dtype = "float16" if decoder.get_inputs()[3].type == "tensor(float16)" else "float32"
    for layer in range(settings["num_decoder_layers"]):
        decoder_feeds[f"past_key_{layer}"] = np.zeros(shape, dtype)
        decoder_feeds[f"past_value_{layer}"] = np.zeros(shape, dtype)
        decoder_feeds[f"cross_key_{layer}"] = encoded[f"cross_key_{layer}"]
        decoder_feeds[f"cross_value_{layer}"] = encoded[f"cross_value_{layer}"]
    names = [o.name for o in decoder.get_outputs()]
    chunks = [(p, p + 1) for p in range(decoder_ids.shape[1])] if step_by_step else [(0, decoder_ids.shape[1])]
    logits = []
    for start, end in chunks:
        decoder_feeds["decoder_token_ids"] = decoder_ids[:, start:end]
        decoder_feeds["cache_position"] = np.array([start], "int64")
        outputs = dict(zip(names, decoder.run(names, decoder_feeds)))
        for layer in range(settings["num_decoder_layers"]):
            decoder_feeds[f"past_key_{layer}"] = outputs[f"present_key_{layer}"]
            decoder_feeds[f"past_value_{layer}"] = outputs[f"present_value_{layer}"]
        logits.append(outputs["logits"])
    return encoded["encoder_output"], np.concatenate(logits, axis=1)


def _check_logits(runtime, seq_2_seq_lm, encoder_ids, encoder_mask, images, decoder_ids, reference=None):
    """ONNX logits (prefill chunk and step by step) against Keras' (compiled) and the reference's."""
    keras_inputs = {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids.astype("int32"),
        "decoder_padding_mask": np.ones(decoder_ids.shape, "int32"),
    }
    if images is not None:
        keras_inputs["images"] = images
    expected = keras.ops.convert_to_numpy(seq_2_seq_lm.predict_on_batch(keras_inputs))
    scale = np.abs(expected).max()
    _, chunk = _decoder_logits(runtime, encoder_ids, encoder_mask, images, decoder_ids, False)
    _, steps = _decoder_logits(runtime, encoder_ids, encoder_mask, images, decoder_ids, True)
    for logits in (chunk, steps):
        assert_matches_reference(logits, expected, atol=1e-4 * scale, rtol_to_scale=1e-4)
    if reference is not None:
        assert_matches_reference(chunk, reference, atol=1e-4 * scale, rtol_to_scale=1e-4)
    return chunk


def test_logits_match_keras_and_reference_with_windows_images_and_padding(random_vision, rng):
    model, seq_2_seq_lm, runtime = random_vision
    encoder_ids, encoder_mask = _encoder_batch(rng, [9, 4], images_per_sample=[1, 2])
    images = rng.normal(size=(2, 2, 28, 28, 3)).astype("float32")
    decoder_ids = np.concatenate([np.full((2, 1), 2), rng.integers(3, 290, (2, 9))], axis=1).astype("int64")
    _check_logits(runtime, seq_2_seq_lm, encoder_ids, encoder_mask, images, decoder_ids)
    # Text only (no image slots), against the reference alone.
    encoder_ids, encoder_mask = _encoder_batch(rng, [11, 6], images_per_sample=[0, 0])
    encoder_output, reference = reference_outputs(
        model, encoder_ids, encoder_mask, decoder_ids, np.ones_like(decoder_ids)
    )
    onnx_encoder_output, logits = _decoder_logits(runtime, encoder_ids, encoder_mask, None, decoder_ids, False)
    assert_matches_reference(logits, reference, atol=1e-4 * np.abs(reference).max(), rtol_to_scale=1e-4)
    assert_matches_reference(onnx_encoder_output, encoder_output, mask=encoder_mask)


def test_greedy_tokens_match_generate_on_a_random_vision_checkpoint(random_vision, rng):
    _, seq_2_seq_lm, runtime = random_vision
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 3, 5], images_per_sample=[2, 1, 0])
    images = rng.normal(size=(3, 2, 28, 28, 3)).astype("float32")
    # Ragged decoder prompts: the runtime prefills a chunk, then each row
    # keeps its own prompt tokens until it is past them.
    decoder_ids = np.zeros((3, NEW_TOKENS + 1), "int32")
    decoder_mask = np.zeros((3, NEW_TOKENS + 1), "int32")
    for row, prompt in enumerate([[2, 17, 40, 9], [2, 5, 71], [2, 33, 8, 100, 4]]):
        decoder_ids[row, : len(prompt)] = prompt
        decoder_mask[row, : len(prompt)] = 1
    inputs = {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": decoder_mask,
        "images": images,
    }
    expected = seq_2_seq_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    output = runtime.generate_token_ids(
        encoder_ids, encoder_mask, images, decoder_ids, decoder_mask, max_length=NEW_TOKENS + 1, stop_token_ids=None
    )
    np.testing.assert_array_equal(output["decoder_token_ids"], expected)
    assert len(np.unique(expected)) > 8  # not one repeated token


def _held_out(count, seed=1):
    return demo_tasks.make_examples(["reverse", "sort", "color"], count=count, seed=seed, held_out=True)


def test_greedy_tokens_match_generate_on_the_demo_held_out_prompts(demo):
    seq_2_seq_lm, _, _, runtime = demo
    examples = _held_out(48)
    prompts = [example.prompt for example in examples]
    images = [[] if example.image is None else [example.image] for example in examples]
    assert 0 < sum(map(len, images)) < len(examples)  # text and image prompts
    # Keras: the preprocessor's token ids, generated by the task without a preprocessor.
    keras_inputs = seq_2_seq_lm.preprocessor.generate_preprocess(
        {"encoder_text": prompts, "images": images}, sequence_length=DEMO_MAX_LENGTH
    )
    keras_inputs = {key: keras.ops.convert_to_numpy(value) for key, value in keras_inputs.items()}
    token_task = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    token_task.compile(sampler="greedy")
    expected = token_task.generate(keras_inputs, stop_token_ids=(seq_2_seq_lm.preprocessor.tokenizer.end_token_id,))

    encoder_ids, encoder_mask, pixels = runtime.encoder_inputs(prompts, images)
    width = encoder_ids.shape[1]
    np.testing.assert_array_equal(encoder_ids, keras_inputs["encoder_token_ids"][:, :width])
    assert not keras_inputs["encoder_padding_mask"][:, width:].any()
    np.testing.assert_array_equal(pixels, keras_inputs["images"])
    output = runtime.generate_token_ids(encoder_ids, encoder_mask, pixels, max_length=DEMO_MAX_LENGTH)
    mask = expected["decoder_padding_mask"]
    np.testing.assert_array_equal(output["decoder_padding_mask"], mask)
    np.testing.assert_array_equal(
        np.where(mask, output["decoder_token_ids"], 0), np.where(mask, expected["decoder_token_ids"], 0)
    )
    answers = runtime.generate(prompts, images, max_length=DEMO_MAX_LENGTH)
    assert [answer.strip() for answer in answers] == [example.target for example in examples]


def test_int8_export_is_a_quarter_of_the_size_and_agrees_with_float32(demo, demo_int8):
    _, folder, _, runtime = demo
    int8_folder, int8_runtime = demo_int8

    def size(path):
        return sum(file.stat().st_size for file in path.iterdir() if file.suffix in (".onnx", ".data"))

    ratio = size(int8_folder) / size(folder)
    assert ratio < 0.4, ratio
    examples = _held_out(AGREEMENT_EXAMPLES, seed=2)
    answers = {}
    for name, model in (("float32", runtime), ("int8", int8_runtime)):
        text = [example for example in examples if example.image is None]
        image = [example for example in examples if example.image is not None]
        answers[name] = model.generate([e.prompt for e in text], max_length=DEMO_MAX_LENGTH) + model.generate(
            [e.prompt for e in image], [e.image for e in image], max_length=DEMO_MAX_LENGTH
        )
    agreement = np.mean([a == b for a, b in zip(answers["float32"], answers["int8"])])
    print(f"int8 greedy agreement with float32: {agreement:.4f} on {len(examples)} prompts; size ratio {ratio:.3f}")
    # The README's claim: the same answers on every one of the held-out prompts (whole answers, so tokens
    # after the end token do not count).
    assert agreement == 1.0, [a for a in zip(answers["float32"], answers["int8"]) if a[0] != a[1]]


def test_embeddings_match_the_embedder(demo, tmp_path):
    seq_2_seq_lm, _, _, runtime = demo
    image = next(example.image for example in _held_out(16) if example.image is not None)
    inputs = [
        "sort: 3 1 2",
        "reverse: 9 8 7 6 5 4",
        {"text": "color: <start_of_image>", "images": image},
        {"images": [image, image[::-1]]},
    ]
    preprocessor = T5Gemma2EmbedderPreprocessor.from_seq_2_seq_preprocessor(seq_2_seq_lm.preprocessor)
    embedder = T5Gemma2Embedder(seq_2_seq_lm.backbone, preprocessor, pooling="mean", normalize=True)
    assert_matches_reference(runtime.embed(inputs), embedder.predict(inputs, verbose=0), atol=1e-5, rtol_to_scale=1e-5)
    # The last real token, unnormalised, against the encoder graph's output
    # (checked against the reference above) pooled in numpy.
    export_onnx(seq_2_seq_lm, tmp_path, pooling="last", normalize=False)
    last = OnnxSeq2SeqLM(tmp_path)
    prompts = [*inputs[:2], inputs[2]["text"]]
    token_ids, padding_mask, pixels = last.encoder_inputs(prompts, [None, None, [image]])
    encoder = last._session("encoder")
    hidden = encoder.run(["encoder_output"], last._encoder_feeds(token_ids, padding_mask, pixels))[0]
    expected = hidden[np.arange(3), padding_mask.sum(axis=1) - 1]
    assert_matches_reference(last.embed(inputs[:3]), expected, atol=1e-5, rtol_to_scale=1e-5)


def test_a_model_with_lora_adapters_exports_with_them_merged(rng, tmp_path):
    config = tiny_config()
    model = reference_model(config, seed=3)
    backbone = backbone_from_reference(model, config, text_only=True)
    backbone.enable_lora(2)
    for weight in backbone.weights:
        if "lora_kernel_b" in weight.path:
            weight.assign(rng.normal(scale=0.05, size=weight.shape).astype("float32"))
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    export_onnx(seq_2_seq_lm, tmp_path, max_decode_length=8)
    runtime = OnnxSeq2SeqLM(tmp_path)
    encoder_ids, encoder_mask = _encoder_batch(rng, [7, 5], images_per_sample=[0, 0])
    decoder_ids = np.concatenate([np.full((2, 1), 2), rng.integers(3, 290, (2, 7))], axis=1).astype("int64")
    _, reference = reference_outputs(model, encoder_ids, encoder_mask, decoder_ids, np.ones_like(decoder_ids))
    logits = _check_logits(runtime, seq_2_seq_lm, encoder_ids, encoder_mask, None, decoder_ids)
    assert np.abs(logits - reference).max() > 1e-3  # the adapters changed the model


def test_prompts_that_do_not_fit_get_clear_errors(demo):
    _, _, _, runtime = demo
    with pytest.raises(ValueError, match="longer than the exported decoder cache of 16"):
        runtime.generate("sort: 1 2", max_length=DEMO_MAX_LENGTH + 1)
    encoder_ids, encoder_mask, _ = runtime.encoder_inputs(["sort: 1 2"])
    with pytest.raises(ValueError, match="decoder prompt has 20 tokens.*cache holds 16"):
        runtime.generate_token_ids(encoder_ids, encoder_mask, decoder_token_ids=np.full((1, 20), 2))
    with pytest.raises(ValueError, match="encoder sequence length is 32"):
        runtime.generate("sort: " + " ".join(["1"] * 40))
    with pytest.raises(ValueError, match="1 <start_of_image> marker.*0 image"):
        runtime.generate("color: <start_of_image>")


def test_export_refuses_a_folder_it_did_not_write(demo, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder"):
        export_onnx(demo[0], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_settings_name_the_files_ids_and_shapes(demo):
    _, folder, settings, _ = demo
    written = json.loads((folder / "t5gemma2_onnx.json").read_text())
    assert written["max_decode_length"] == DEMO_MAX_LENGTH
    assert written["opset"] >= 17
    assert written["tokenizer"]["special_token_ids"]["image_placeholder"] == 6
    assert written["image_converter"]["image_size"] == [16, 16]
    for name in written["files"].values():
        assert (folder / name).is_file()


def test_the_runtime_imports_no_training_framework(demo):
    _, folder, _, _ = demo
    code = (
        "import sys; from t5gemma_onnx import OnnxSeq2SeqLM; "
        f"print(OnnxSeq2SeqLM({str(folder)!r}).generate('reverse: 1 2 3', max_length=8)); "
        "print([m for m in ('keras', 'jax', 'tensorflow', 'torch', 'keras_hub', 'keras_t5gemma') if m in sys.modules])"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    answer, loaded = result.stdout.strip().splitlines()
    assert answer.strip() == "3 2 1"
    assert loaded == "[]"


def test_command_line_exports_and_generates_from_the_export(capsys, tmp_path):
    output = tmp_path / "digits_onnx"
    status = main(["export", str(output), "--format", "onnx", "--quantize", "int8", "--max-decode-length", "12"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "int8" in captured.out and json.loads((output / "t5gemma2_onnx.json").read_text())["quantization"] == "int8"
    red = tmp_path / "red.png"
    Image.fromarray(np.full((40, 30, 3), (210, 25, 30), "uint8")).save(red)
    status = main(["generate", "--onnx", str(output), "reverse: 5 0 2 7", "sort: 9 4 7 1", "--show-prompt"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.splitlines() == ["reverse: 5 0 2 7 -> 7 2 0 5", "sort: 9 4 7 1 -> 1 4 7 9"]
    assert main(["generate", "--onnx", str(output), "color:", "--image", str(red)]) == 0
    assert capsys.readouterr().out.strip() == "red"
    for argv, message in (
        (["generate", "--onnx", str(output), "x", "--max-length", "13"], "longer than the exported decoder cache"),
        (["generate", "--onnx", str(tmp_path / "missing"), "x"], "is not a T5Gemma ONNX export"),
        (["export", str(tmp_path), "--format", "onnx"], "non-empty folder"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("keras-t5gemma: error:") and message in err and "Traceback" not in err
    assert main(["export", str(output)]) == 2  # --format is required


def test_an_interrupted_export_leaves_the_earlier_one_and_the_users_files(demo, tmp_path, monkeypatch):
    from keras_t5gemma.export import onnx as onnx_export

    export_onnx(demo[0], tmp_path, max_decode_length=DEMO_MAX_LENGTH)
    (tmp_path / "notes.txt").write_text("mine")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def fail_after_the_graphs(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_special_token_ids", fail_after_the_graphs)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(demo[0], tmp_path, max_decode_length=DEMO_MAX_LENGTH + 1)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert not [path for path in tmp_path.parent.iterdir() if path.name.startswith(f".{tmp_path.name}.")]
    monkeypatch.undo()
    export_onnx(demo[0], tmp_path, max_decode_length=DEMO_MAX_LENGTH + 1)
    assert json.loads((tmp_path / "t5gemma2_onnx.json").read_text())["max_decode_length"] == DEMO_MAX_LENGTH + 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
