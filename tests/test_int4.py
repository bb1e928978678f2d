"""4-bit weights in Keras: `quantize("int4")` on every task, int4 presets, quantize-on-load, QLoRA.

The held-out agreement is measured on the bundled trained preset (BENCHMARKS.md's "Precisions
(Keras)"); the equalities are exact (the same arithmetic on the same stored values).
"""

import dataclasses
import warnings

import keras
import numpy as np
import pytest
from hf_checkpoints import checkpoint_config
from hf_checkpoints import write_checkpoint

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2Embedder
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import T5Gemma2TextClassifier
from keras_t5gemma import T5Gemma2TokenClassifier
from keras_t5gemma import demo
from keras_t5gemma.conversion import quantized_loading

HELD_OUT = 150


def _dtype(variable):
    return keras.backend.standardize_dtype(variable.dtype)


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _quantizable_modes(model):
    """`{path: quantization_mode}` of every Dense, EinsumDense and Embedding leaf layer."""
    kinds = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)
    return {layer.path: layer.quantization_mode for layer in model._flatten_layers() if isinstance(layer, kinds)}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, small_proto):
    folder = tmp_path_factory.mktemp("hf_checkpoint")
    write_checkpoint(folder, checkpoint_config(), small_proto)
    return str(folder)


@pytest.fixture(scope="module")
def int4_digits():
    """The bundled preset quantized to int4, and its float32 answers to the held-out prompts."""
    examples = demo.make_examples(["reverse", "sort", "color"], HELD_OUT, seed=21, held_out=True)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(sampler="greedy")
    expected = demo.generate_answers(seq_2_seq_lm, examples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq_2_seq_lm.quantize("int4")
    assert not [w for w in caught if "quantize" in str(w.message)]  # no per-layer noise
    seq_2_seq_lm.compile(sampler="greedy")
    return seq_2_seq_lm, examples, expected


def test_int4_answers_agree_with_float32_on_held_out_prompts(int4_digits):
    seq_2_seq_lm, examples, expected = int4_digits
    # Everything `quantize` converts is int4: the tied table and the vision tower included.
    modes = _quantizable_modes(seq_2_seq_lm)
    assert any(path.startswith("t5_gemma2_vision_encoder/") for path in modes)
    assert set(modes.values()) == {"int4"}, {p: m for p, m in modes.items() if m != "int4"}
    table = seq_2_seq_lm.backbone.token_embedding.table
    # Two 4-bit values per byte: the (V, D) table is stored as (V, D / 2) int8.
    assert _dtype(table._embeddings) == "int8" and table._embeddings.shape[1] == table.output_dim // 2
    answers = demo.generate_answers(seq_2_seq_lm, examples)
    assert sum(example.image is not None for example in examples) > 0
    agreement = np.mean([a == b for a, b in zip(answers, expected)])
    assert agreement >= 0.97, [(e.prompt, a, b) for e, a, b in zip(examples, expected, answers) if a != b]
    # Not vacuous: float32 answers the held-out prompts right (the preset's recorded 100%).
    assert demo.exact_match(expected, examples) == 1.0


def test_an_int4_preset_reloads_with_the_same_logits(int4_digits, tmp_path):
    seq_2_seq_lm, examples, _ = int4_digits
    seq_2_seq_lm.save_to_preset(tmp_path / "int4")
    restored = T5Gemma2Seq2SeqLM.from_preset(str(tmp_path / "int4"))
    assert set(_quantizable_modes(restored).values()) == {"int4"}
    by_path = {variable.path: variable for variable in restored.weights}
    for variable in seq_2_seq_lm.weights:
        assert _dtype(by_path[variable.path]) == _dtype(variable), variable.path
        np.testing.assert_array_equal(_numpy(by_path[variable.path]), _numpy(variable), err_msg=variable.path)
    x, _ = demo.as_inputs(examples[:8])
    inputs = seq_2_seq_lm.preprocessor(x)[0]
    np.testing.assert_array_equal(_numpy(restored(inputs)), _numpy(seq_2_seq_lm(inputs)))


# The vision tower's layers are covered with float32 for the other layers.
@pytest.mark.parametrize(
    "dtype, text_only", [("float32", False), pytest.param("bfloat16", True, marks=pytest.mark.slow)]
)
def test_int4_straight_load_equals_float_load_then_quantize(hf_folder, dtype, text_only, monkeypatch):
    # Small blocks, so that the table (330 rows) is quantized in 11 blocks, the last one short.
    monkeypatch.setattr(quantized_loading, "_BLOCK_BYTES", 32 * 32 * 4)
    expected = T5Gemma2Backbone.from_preset(hf_folder, dtype=dtype, text_only=text_only)
    float_logits = _numpy(expected.token_embedding.logits(np.ones((1, 1, expected.hidden_dim), dtype)))
    expected.quantize("int4")
    backbone = T5Gemma2Backbone.from_preset(hf_folder, dtype=dtype, text_only=text_only, quantize="int4")
    assert _quantizable_modes(backbone) == _quantizable_modes(expected)
    assert set(_quantizable_modes(backbone).values()) == {"int4"}
    by_path = {variable.path: variable for variable in backbone.weights}
    assert sorted(by_path) == sorted(variable.path for variable in expected.weights)
    for variable in expected.weights:
        ours = by_path[variable.path]
        assert _dtype(ours) == _dtype(variable), variable.path
        np.testing.assert_array_equal(_numpy(ours), _numpy(variable), err_msg=variable.path)
    # No float kernel or table in a quantized layer: none was ever built there.
    for layer in backbone._flatten_layers():
        if layer.quantization_mode is not None:
            assert all(_dtype(v) == "int8" for v in layer.weights if v.name in ("kernel", "embeddings")), layer.path
    hidden = np.random.default_rng(0).normal(size=(1, 1, backbone.hidden_dim)).astype(dtype)
    logits = _numpy(backbone.token_embedding.logits(hidden))
    np.testing.assert_array_equal(logits, _numpy(expected.token_embedding.logits(hidden)))
    # Not vacuous: 4-bit logits differ from the float ones.
    ones = _numpy(backbone.token_embedding.logits(np.ones((1, 1, backbone.hidden_dim), dtype)))
    assert np.abs(ones.astype("float32") - float_logits.astype("float32")).max() > 0


def _task_outputs(model):
    if isinstance(model, T5Gemma2TokenClassifier):
        return np.concatenate(model.predict_words([["1", "2", "3", "4"], ["9", "8"]], verbose=0))
    return model.predict(["1 2 3 4", "9 8"], verbose=0)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [T5Gemma2Embedder, T5Gemma2TextClassifier, T5Gemma2TokenClassifier])
def test_every_task_quantizes_to_int4_and_reloads(cls, tmp_path):
    extra = {} if cls is T5Gemma2Embedder else {"num_classes": 3}
    keras.utils.set_random_seed(0)
    model = cls.from_preset("t5gemma2_tiny_digits", **extra)
    expected = _task_outputs(model)
    model.quantize("int4")
    modes = _quantizable_modes(model)
    assert set(modes.values()) == {"int4"}, modes
    outputs = _task_outputs(model)
    # 4-bit weights: near the float outputs (correlated), not equal to them.
    assert np.abs(outputs - expected).max() > 0
    correlation = np.corrcoef(outputs.ravel(), expected.ravel())[0, 1]
    assert correlation > 0.8, correlation
    model.save_to_preset(tmp_path / "int4")
    restored = cls.from_preset(str(tmp_path / "int4"))
    np.testing.assert_array_equal(_task_outputs(restored), outputs)


def test_lora_fits_on_top_of_int4_weights():
    """QLoRA: frozen packed 4-bit weights, float adapters trained."""
    keras.utils.set_random_seed(4)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits", quantize="int4")
    seq_2_seq_lm.backbone.enable_lora(4)
    frozen = {v.path: _numpy(v) for v in seq_2_seq_lm.weights if "int" in _dtype(v)}
    assert len(frozen) > 10
    trainable = [v.path for v in seq_2_seq_lm.trainable_weights]
    assert trainable and all("lora" in path or path.endswith("/bias") for path in trainable), trainable
    # A task the preset was not trained on (adding one to each digit), so that the loss has room to fall.
    examples = demo.make_examples(["reverse"], 64, seed=5)
    examples = [
        dataclasses.replace(example, target=" ".join(str((int(d) + 1) % 10) for d in example.target.split()))
        for example in examples
    ]
    x, _ = demo.as_inputs(examples)
    seq_2_seq_lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    history = seq_2_seq_lm.fit(x, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.95 * losses[0], losses
    for variable in seq_2_seq_lm.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(_numpy(variable), frozen[variable.path], err_msg=variable.path)


@pytest.mark.slow
def test_gptq_4bit_answers_agree_with_float32():
    """GPTQ on the demo's training prompts (answers: the float model's own), then the held-out prompts."""
    examples = demo.make_examples(["reverse", "sort", "color"], 60, seed=21, held_out=True)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(sampler="greedy")
    expected = demo.generate_answers(seq_2_seq_lm, examples)
    training = demo.make_examples(["reverse", "sort", "color"], 64, seed=5)
    images = [[] if example.image is None else [example.image] for example in training]
    calibrated = seq_2_seq_lm.gptq_quantize({"encoder_text": [e.prompt for e in training], "images": images})
    modes = _quantizable_modes(seq_2_seq_lm)
    assert set(calibrated) == {path for path, mode in modes.items() if mode == "gptq"} and calibrated
    assert set(modes.values()) == {"gptq", "int4"}  # the table and the vision tower: int4
    seq_2_seq_lm.compile(sampler="greedy")
    answers = demo.generate_answers(seq_2_seq_lm, examples)
    agreement = np.mean([a == b for a, b in zip(answers, expected)])
    assert agreement >= 0.97, agreement
