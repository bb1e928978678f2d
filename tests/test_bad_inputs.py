"""Bad input, as a careless or hostile user gives it: one clear error naming the problem,
no silently wrong answer, and no file lost (issue 19). CLI cases run through the CLI."""

import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_cli import run
from test_cli import write_jsonl

from keras_t5gemma.models.t5gemma2 import t5gemma2_seq_2_seq_lm_preprocessor as preprocessor_module
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.training.fine_tune import DEFAULT_PRESET
from keras_t5gemma.utils.preset_utils import resolve_preset

BUNDLED = resolve_preset(DEFAULT_PRESET)


@pytest.fixture(scope="module")
def seq_2_seq_lm():
    """The bundled (vision) preset, greedy, short lengths: shared by the API cases."""
    model = T5Gemma2Seq2SeqLM.from_preset(DEFAULT_PRESET)
    model.compile(sampler="greedy")
    model.preprocessor.encoder_sequence_length = 24
    return model


@pytest.fixture(scope="module")
def on_ids(seq_2_seq_lm):
    """The same backbone without a preprocessor: inputs are token ids."""
    model = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    model.compile(sampler="greedy")
    return model


def _preset_copy(tmp_path, name="preset"):
    folder = tmp_path / name
    shutil.copytree(BUNDLED, folder)
    return folder


def _token_inputs(encoder_token_ids):
    encoder_token_ids = np.asarray(encoder_token_ids)
    decoder = np.array([[2, 0, 0, 0]], "int32")
    return {
        "encoder_token_ids": encoder_token_ids,
        "encoder_padding_mask": np.ones(encoder_token_ids.shape, "int32"),
        "decoder_token_ids": decoder,
        "decoder_padding_mask": (decoder > 0).astype("int32"),
    }


# === Nothing lost: safe writes ===


def test_save_to_preset_refuses_a_non_empty_folder_and_overwrites_only_its_own_files(seq_2_seq_lm, tmp_path):
    target = _preset_copy(tmp_path)  # a preset with a DESCRIPTION, as the bundled one
    before = (target / "config.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds \\['assets', 'config.json'.*refusing to overwrite"):
        seq_2_seq_lm.save_to_preset(str(target))
    (target / "NOTES.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty; refusing to write into it"):
        seq_2_seq_lm.save_to_preset(str(target))
    assert (target / "config.json").read_bytes() == before and (target / "DESCRIPTION").exists()

    seq_2_seq_lm.save_to_preset(str(target), overwrite=True)
    assert not (target / "DESCRIPTION").exists()  # the previous preset's file, not left stale
    assert (target / "NOTES.txt").read_text() == "mine"  # the user's file, kept
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary left
    T5Gemma2Seq2SeqLM.from_preset(str(target), load_weights=False)


def test_an_interrupted_save_leaves_the_folder_as_it_was(seq_2_seq_lm, tmp_path, monkeypatch):
    target = _preset_copy(tmp_path)
    before = {path.name: path.read_bytes() for path in target.iterdir() if path.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(seq_2_seq_lm.backbone), "save_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        seq_2_seq_lm.save_to_preset(str(target), overwrite=True)
    assert {path.name: path.read_bytes() for path in target.iterdir() if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["preset"]


def test_atomic_file_keeps_the_old_content_on_error(tmp_path):
    from keras_t5gemma.utils.safe_files import atomic_file

    path = tmp_path / "vectors.jsonl"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path, "w") as file:
            file.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["vectors.jsonl"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, small_proto):
    pytest.importorskip("transformers")
    from hf_checkpoints import checkpoint_config
    from hf_checkpoints import write_checkpoint

    folder = tmp_path_factory.mktemp("hf")
    write_checkpoint(folder, checkpoint_config(), small_proto)
    return folder


def test_convert_never_writes_into_its_source(capsys, hf_folder):
    files = {path.name: path.read_bytes() for path in hf_folder.iterdir()}
    for output in (hf_folder, hf_folder / "keras"):
        status, _, err = run(capsys, "convert", hf_folder, output, "--overwrite")
        assert status == 2 and "never writes into its source" in err, err
    assert {path.name: path.read_bytes() for path in hf_folder.iterdir()} == files


def test_convert_refuses_a_non_empty_output_without_overwrite(capsys, hf_folder, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")
    status, _, err = run(capsys, "convert", hf_folder, output)
    assert status == 2 and "is not empty" in err and "--overwrite" in err
    assert (output / "config.json").read_text() == "{}"


def test_embed_refuses_to_overwrite_an_existing_file(capsys, tmp_path):
    output = tmp_path / "vectors.npy"
    output.write_bytes(b"the user's")
    status, _, err = run(capsys, "embed", "sort: 1 2", "--output", output)
    assert status == 2 and "exists; pass --overwrite" in err
    assert output.read_bytes() == b"the user's"


# === Strict loading ===


def _damaged_checkpoint(hf_folder, tmp_path, change):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    folder = tmp_path / "damaged"
    shutil.copytree(hf_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_transposed_tensor_is_refused_by_name(hf_folder, tmp_path):
    from keras_t5gemma import T5Gemma2Backbone

    key = "model.encoder.layers.0.self_attn.k_proj.weight"

    def transpose(tensors):
        tensors[key] = np.ascontiguousarray(tensors[key].T)  # same element count

    folder = _damaged_checkpoint(hf_folder, tmp_path, transpose)
    with pytest.raises(ValueError, match=f"`{key}` has shape \\(32, 16\\), which does not fit .* needs \\(16, 32\\)"):
        T5Gemma2Backbone.from_preset(str(folder))


def test_an_integer_tensor_for_a_float_weight_is_refused(hf_folder, tmp_path):
    from keras_t5gemma import T5Gemma2Backbone

    key = "model.encoder.norm.weight"

    def to_int(tensors):
        tensors[key] = tensors[key].astype("int32")

    folder = _damaged_checkpoint(hf_folder, tmp_path, to_int)
    with pytest.raises(ValueError, match=f"`{key}` holds int32 values"):
        T5Gemma2Backbone.from_preset(str(folder))


def test_index_entries_leaving_the_checkpoint_folder_are_refused(hf_folder, tmp_path):
    from safetensors.numpy import load_file

    from keras_t5gemma import T5Gemma2Backbone

    folder = tmp_path / "indexed"
    shutil.copytree(hf_folder, folder)
    keys = list(load_file(folder / "model.safetensors"))
    weight_map = {key: "model.safetensors" for key in keys}
    weight_map[keys[0]] = "../../outside/model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    with pytest.raises(ValueError, match="not a file inside the checkpoint folder"):
        T5Gemma2Backbone.from_preset(str(folder))


def test_fine_tune_says_when_an_image_is_outside_the_data_folder(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(tmp_path / "outside.png")
    path = write_jsonl(data / "train.jsonl", [{"input": "color:", "target": "red", "image": "../outside.png"}])
    from keras_t5gemma.data import read_pairs

    read_pairs(str(path))
    assert "train.jsonl, line 1: the image" in capsys.readouterr().err


# === Silent wrong results, now errors ===


def test_an_image_marker_without_an_image_is_an_error(seq_2_seq_lm, capsys):
    with pytest.raises(ValueError, match="1 <start_of_image> marker\\(s\\) but no image was given"):
        seq_2_seq_lm.generate("color: <start_of_image>", max_length=8)
    status, _, err = run(capsys, "generate", "color: <start_of_image>")
    assert status == 2 and "has more <start_of_image> markers than the 0 image(s) given" in err


def test_the_image_placeholder_typed_as_text_is_an_error(seq_2_seq_lm):
    with pytest.raises(ValueError, match="holds `<image_soft_token>`, the image placeholder, as text"):
        seq_2_seq_lm.generate("color: <image_soft_token>", max_length=8)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels_are_an_error(seq_2_seq_lm, value):
    image = np.full((12, 12, 3), 100.0, "float32")
    image[3, 4, 1] = value
    with pytest.raises(ValueError, match="1 NaN or infinite pixel value"):
        seq_2_seq_lm.generate({"encoder_text": ["color:"], "images": [[image]]}, max_length=8)


@pytest.mark.parametrize(
    "token_ids, message",
    [
        ([[2, 99_999, 5]], "holds ids in \\[2, 99999\\], outside the vocabulary of 320"),
        ([[2, -4, 5]], "holds ids in \\[-4, 5\\], outside the vocabulary"),
        ([[2.0, 7.6, 5.0]], "must hold integer token ids; got float64"),
    ],
)
def test_token_ids_are_checked_without_a_preprocessor(on_ids, token_ids, message):
    with pytest.raises(ValueError, match=f"`encoder_token_ids` {message}"):
        on_ids.generate(_token_inputs(token_ids), stop_token_ids=None)
    with pytest.raises(ValueError, match=f"`encoder_token_ids` {message}"):
        on_ids.predict(_token_inputs(token_ids), verbose=0)


def test_the_command_line_and_the_api_see_a_transparent_image_alike(tmp_path):
    from keras_t5gemma.training.fine_tune import load_image as _load_image

    pixels = np.zeros((6, 6, 4), "uint8")
    pixels[..., 0] = 200
    pixels[:3, :, 3] = 0  # the top half transparent
    pixels[3:, :, 3] = 255
    path = tmp_path / "half.png"
    Image.fromarray(pixels, "RGBA").save(path)
    from_file = _load_image(str(path))
    from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import pil_image_to_rgb

    np.testing.assert_array_equal(from_file, pil_image_to_rgb(Image.open(path)))
    np.testing.assert_array_equal(from_file[0, 0], [255, 255, 255])  # composited on white
    np.testing.assert_array_equal(from_file[5, 0], [200, 0, 0])


# === Crashes, now clear errors ===


def test_empty_prompts_are_answered_and_an_empty_batch_is_an_error(seq_2_seq_lm):
    alone = seq_2_seq_lm.generate(["reverse: 1 2"], max_length=8)
    # An empty prompt last in a batch kept its row (it vanished in the placeholder insertion).
    assert seq_2_seq_lm.generate(["reverse: 1 2", ""], max_length=8)[0] == alone[0]
    assert isinstance(seq_2_seq_lm.generate("", max_length=8), str)
    with pytest.raises(ValueError, match="`encoder_text` is an empty batch"):
        seq_2_seq_lm.generate([], max_length=8)


def test_training_rows_with_empty_inputs_keep_their_place(seq_2_seq_lm):
    x, _, _ = seq_2_seq_lm.preprocessor({"encoder_text": ["sort: 2 1", ""], "decoder_text": ["1 2", "x"]})
    assert x["encoder_token_ids"].shape[0] == x["decoder_token_ids"].shape[0] == 2
    assert list(np.asarray(x["encoder_padding_mask"]).sum(axis=-1))[1] == 1  # `<bos>` only


@pytest.mark.parametrize(
    "prompt, message",
    [
        (None, "`encoder_text` must be a string or a list of strings; got NoneType"),
        (b"sort: 2 1", "got bytes b'sort: 2 1' \\(decode bytes first"),
        (7, "got int 7"),
        (["sort: 2 1", None], "`encoder_text\\[1\\]` is NoneType None; texts must be strings"),
    ],
)
def test_prompts_that_are_not_strings_are_an_error(seq_2_seq_lm, prompt, message):
    with pytest.raises(ValueError, match=message):
        seq_2_seq_lm.generate(prompt, max_length=8)


def test_fine_tune_with_an_empty_input_trains(capsys, tmp_path):
    # Batches of one: the empty input is the last row of its batch.
    data = write_jsonl(tmp_path / "data.jsonl", [{"input": "sort: 2 1", "target": "1 2"}, {"input": "", "target": "0"}])
    argv = ["fine-tune", data, "--output", tmp_path / "out", "--epochs", "1", "--batch-size", "1"]
    status, _, err = run(capsys, *argv, "--encoder-length", "8", "--decoder-length", "4", "--quiet")
    assert status == 0, err


def test_fine_tune_refuses_markers_without_images_and_placeholders(capsys, tmp_path):
    data = write_jsonl(tmp_path / "marker.jsonl", [{"input": "color: <start_of_image>", "target": "red"}])
    status, _, err = run(capsys, "fine-tune", data, "--output", tmp_path / "out")
    assert status == 2 and "marker.jsonl, line 1: `input` has a <start_of_image> marker but" in err
    data = write_jsonl(tmp_path / "soft.jsonl", [{"input": "color: <image_soft_token>", "target": "red"}])
    status, _, err = run(capsys, "fine-tune", data, "--output", tmp_path / "out")
    assert status == 2 and "soft.jsonl: the input 'color: <image_soft_token>' holds <image_soft_token>" in err


def test_a_garbage_tokenizer_file_is_named(capsys, tmp_path):
    folder = _preset_copy(tmp_path)
    vocabulary = folder / "assets" / "tokenizer" / "vocabulary.spm"
    vocabulary.write_bytes(b"not a sentencepiece model" * 10)
    status, _, err = run(capsys, "generate", "--preset", folder, "sort: 2 1")
    assert status == 2 and f"`{vocabulary}` is not a SentencePiece model" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_huge_image_is_refused(capsys, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (14_000, 14_000)).save(path)  # 196 million pixels, 25 kB on disk
    status, _, err = run(capsys, "generate", "color:", "--image", path)
    assert status == 2 and f"the image {path} is too large to read safely" in err


@pytest.mark.parametrize("name", ["config.json", "task.json"])
def test_invalid_json_in_a_preset_is_named(capsys, tmp_path, name):
    folder = _preset_copy(tmp_path)
    (folder / name).write_text('{"class_name": ')
    status, _, err = run(capsys, "generate", "--preset", folder, "sort: 2 1")
    assert status == 2 and f"{name}` is not valid JSON" in err and str(folder) in err, err


def test_a_preset_naming_an_unknown_class_is_named(capsys, tmp_path):
    folder = _preset_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["registered_name"] = "keras_t5gemma>NoSuchBackbone"
    (folder / "config.json").write_text(json.dumps(config))
    status, _, err = run(capsys, "generate", "--preset", folder, "sort: 2 1")
    assert status == 2 and "config.json` names the class `keras_t5gemma>NoSuchBackbone`" in err


def test_an_hf_handle_without_network_fails_at_once(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.time()
    status, _, err = run(capsys, "generate", "--preset", "hf://someone/t5gemma-2-tiny", "sort: 2 1")
    assert status == 2 and "Cannot reach the Hugging Face Hub" in err and "config.json" in err, err
    assert time.time() - started < 10


def test_two_threads_generating_on_a_fresh_model_share_one_build(monkeypatch):
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(DEFAULT_PRESET)
    seq_2_seq_lm.compile(sampler="greedy")
    packer = preprocessor_module.StartEndPacker
    calls = []

    def slow_packer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)  # the first build is still running when the second thread starts
        return packer(*args, **kwargs)

    monkeypatch.setattr(preprocessor_module, "StartEndPacker", slow_packer)
    errors, answers = [], []

    def generate(prompt):
        try:
            answers.append(seq_2_seq_lm.generate(prompt, max_length=8))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=generate, args=(prompt,)) for prompt in ("reverse: 1 2", "sort: 2 1")]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(answers) == ["1 2", "2 1"]
    assert len(calls) == 2  # one build: an encoder and a decoder packer


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([("a", "b", None, "extra")], "example 0: expected an \\(input, target\\)"),
        ([("a", 3)], "example 0: the input and the target must be strings"),
        ([("a", "b"), ("color: <start_of_image>", "red")], "example 1: the input has a <start_of_image> marker"),
        ([("a", "b", "missing.png")], "example 0: no such image file: missing.png"),
        ([], "the data has no examples"),
    ],
)
def test_in_memory_examples_name_the_bad_one(pairs, message):
    # `fine_tune(data=[...])` and `evaluate(model, [...])` both check in-memory examples this way.
    from keras_t5gemma.data import check_pairs

    with pytest.raises(ValueError, match=message):
        check_pairs(pairs, image_marker="<start_of_image>")
    assert check_pairs([("a", "b")]) == [("a", "b", None)]
