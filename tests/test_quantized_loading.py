"""`from_preset(..., quantize="int8")`: straight into int8, equal to a float load quantized afterwards.

Equal weights and logits imply equal greedy tokens; the int8 answers on the demo preset are in
`test_quantization.py`.
"""

import keras
import numpy as np
import pytest
from hf_checkpoints import checkpoint_config
from hf_checkpoints import write_checkpoint

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import T5Gemma2TextClassifier
from keras_t5gemma import T5Gemma2Tokenizer
from keras_t5gemma.conversion import quantized_loading
from keras_t5gemma.utils.loading import numpy_dtype


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, small_proto):
    folder = tmp_path_factory.mktemp("hf_checkpoint")
    write_checkpoint(folder, checkpoint_config(), small_proto)
    return str(folder)


def _logits(backbone, hidden):
    return keras.ops.convert_to_numpy(backbone.token_embedding.logits(hidden)).astype("float32")


def _dtype(variable):
    return keras.backend.standardize_dtype(variable.dtype)


# The vision tower's layers are covered with bfloat16 for the other layers.
@pytest.mark.parametrize("dtype, text_only", [("float32", True), ("bfloat16", False)])
def test_int8_straight_load_equals_float_load_then_quantize(hf_folder, dtype, text_only, monkeypatch):
    # Small blocks, so that the table (330 rows) is quantized in 11 blocks, the last one short.
    monkeypatch.setattr(quantized_loading, "_BLOCK_BYTES", 32 * 32 * 4)
    expected = T5Gemma2Backbone.from_preset(hf_folder, dtype=dtype, text_only=text_only)
    expected.quantize("int8")
    backbone = T5Gemma2Backbone.from_preset(hf_folder, dtype=dtype, text_only=text_only, quantize="int8")

    by_path = {variable.path: variable for variable in backbone.weights}
    assert sorted(by_path) == sorted(variable.path for variable in expected.weights)
    for variable in expected.weights:
        ours = by_path[variable.path]
        assert _dtype(ours) == _dtype(variable), variable.path
        np.testing.assert_array_equal(np.asarray(ours.numpy()), np.asarray(variable.numpy()), err_msg=variable.path)
    # Not vacuous: the table, the projections and the vision tower's are int8, the rest `dtype`.
    table = backbone.token_embedding.table
    assert table.quantization_mode == "int8" and _dtype(table._embeddings) == "int8"
    if not text_only:
        assert _dtype(backbone.vision_encoder.vision_layers[0].feedforward.up_dense._kernel) == "int8"
    assert _dtype(backbone.encoder.final_norm.scale) == dtype
    assert np.abs(table.embeddings_scale.numpy().astype("float32") - 1.0).max() > 0  # scales were filled
    # No float kernel or table in a quantized layer: none was ever built there.
    for layer in backbone._flatten_layers():
        if layer.quantization_mode is not None:
            assert all(_dtype(v) == "int8" for v in layer.weights if v.name in ("kernel", "embeddings")), layer.path
    # The same logits from one decoder state (batch-1 decoding's one-row product, the int8 path's own).
    hidden = np.random.default_rng(0).normal(size=(1, 1, backbone.hidden_dim)).astype(dtype)
    np.testing.assert_array_equal(_logits(backbone, hidden), _logits(expected, hidden))


def test_a_classifier_head_is_quantized_with_the_backbone(hf_folder):
    classifier = T5Gemma2TextClassifier.from_preset(hf_folder, num_classes=3, text_only=True, quantize="int8")
    assert classifier.output_dense.quantization_mode == "int8"
    assert classifier.backbone.token_embedding.table.quantization_mode == "int8"


def test_a_keras_preset_is_quantized_after_loading(tmp_path):
    backbone = T5Gemma2Backbone.from_preset("t5gemma2_tiny_digits", quantize="int8")
    assert backbone.token_embedding.table.quantization_mode == "int8"


def test_an_unknown_quantization_mode_is_refused_by_name(hf_folder):
    with pytest.raises(ValueError, match="Unknown quantization mode 'int2'; `quantize` accepts int8, int4"):
        T5Gemma2Backbone.from_preset(hf_folder, quantize="int2")
    with pytest.raises(ValueError, match="`quantize` applies to backbones and tasks, not to `T5Gemma2Tokenizer`"):
        T5Gemma2Tokenizer.from_preset(hf_folder, quantize="int8")


def test_an_abstract_backbone_stays_without_values_after_a_stateless_scope():
    from keras_t5gemma.training.memory import abstract_backbone

    backbone = abstract_backbone(checkpoint_config(), text_only=True)
    # Leaving a top-level stateless scope (every `predict`) allocates Keras' waiting variables.
    with keras.StatelessScope():
        pass
    assert backbone.weights and all(variable._value is None for variable in backbone.weights)


def test_a_quantized_backbone_with_a_vision_tower_rebuilds_from_its_config():
    from keras_t5gemma.conversion.config import backbone_from_hf_config

    backbone = backbone_from_hf_config(checkpoint_config())
    backbone.quantize("int8")
    assert backbone.vision_encoder.projection.quantization_mode == "int8"
    # What `save_to_preset` / `.keras` reloads build: every quantized layer, the vision tower's too.
    restored = T5Gemma2Backbone.from_config(backbone.get_config())
    assert restored.vision_encoder.projection.quantization_mode == "int8"
    assert restored.vision_encoder.vision_layers[0].attention.query_key_value_dense.quantization_mode == "int8"
    restored.set_weights(backbone.get_weights())
    assert _dtype(restored.vision_encoder.projection._kernel) == "int8"


def _remat_flags(model):
    backbone = getattr(model, "backbone", model)
    stacks = [stack for stack in (backbone.encoder, backbone.decoder) if stack is not None]
    return {backbone.remat} | {layer.remat for stack in stacks for layer in stack.transformer_layers}


@pytest.mark.parametrize("cls", [T5Gemma2Backbone, T5Gemma2Seq2SeqLM, T5Gemma2TextClassifier])
def test_backbone_options_reach_the_layers_from_every_loader(hf_folder, cls):
    # One route for every loader: a Hugging Face folder and the bundled Keras preset (its saved
    # backbone says `remat: False`; its `task.json` holds a `T5Gemma2Seq2SeqLM`).
    extra = {"num_classes": 2} if cls is T5Gemma2TextClassifier else {}
    for preset in (hf_folder, "t5gemma2_tiny_digits"):
        assert _remat_flags(cls.from_preset(preset, **extra)) == {False}
        model = cls.from_preset(preset, remat=True, dtype="bfloat16", **extra)
        assert _remat_flags(model) == {True}, preset
        assert getattr(model, "backbone", model).dtype_policy.name == "bfloat16"


@pytest.mark.parametrize("stored, dtype", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_the_jitted_quantizer_gives_keras_numpy_values(stored, dtype):
    # Keras' own `abs_max_quantize` in NumPy, on the value in the variable's dtype, is the reference;
    # its 16-bit arithmetic rounds each product, so ties and near-ties are where a float32-only
    # computation would differ. A float32 tensor for a bfloat16 variable is converted inside the
    # jitted function.
    rng = np.random.default_rng(3)
    value = (rng.normal(size=(96, 40)) * 0.02).astype(numpy_dtype(stored))
    value[:, 0] = 0  # a zero column: the scale is 127 / epsilon
    value[:, 1] = np.linspace(-300, 300, 96)  # large magnitudes
    value[:, 2] = np.arange(96) - 48  # exact multiples that scale onto .5 steps
    cases = (((0,), (-127, 127)), ((-1,), (-127, 127)), ((0,), (-8, 7)), ((0,), (-127, 127)))
    # All dispatched before any is read (each runs while the next is dispatched).
    results = []
    for number, (axis, value_range) in enumerate(cases):
        results.append(quantized_loading._abs_max_quantize(value * (number + 1), axis, value_range, numpy_dtype(dtype)))
    for number, ((axis, value_range), (values, scale)) in enumerate(zip(cases, results)):
        expected, expected_scale = keras.quantizers.abs_max_quantize(
            (value * (number + 1)).astype(numpy_dtype(dtype)),
            axis,
            value_range,
            "int8",
            quantized_loading._EPSILON,
            to_numpy=True,
        )
        assert values.dtype == np.int8 and scale.dtype == numpy_dtype(dtype)
        np.testing.assert_array_equal(np.asarray(values), keras.ops.convert_to_numpy(expected))
        np.testing.assert_array_equal(np.asarray(scale), keras.ops.convert_to_numpy(expected_scale))
        assert len(np.unique(np.asarray(values))) > 10  # not vacuous


@pytest.mark.parametrize("value_range", [(-127, 127), (-8, 7)])
def test_the_jitted_scale_is_numpy_s_for_every_bfloat16_magnitude(value_range):
    # Column j's largest magnitude is the j-th finite non-negative bfloat16: the scale's two rounded
    # operations (the epsilon's addition, the division) against NumPy's for all of them.
    magnitudes = np.arange(0x7F80, dtype=np.uint16).view(numpy_dtype("bfloat16"))
    value = np.stack([magnitudes, -magnitudes, magnitudes / 3]).astype(numpy_dtype("bfloat16"))
    values, scale = quantized_loading._abs_max_quantize(value, (0,), value_range)
    expected, expected_scale = keras.quantizers.abs_max_quantize(
        value, (0,), value_range, "int8", quantized_loading._EPSILON, to_numpy=True
    )
    np.testing.assert_array_equal(np.asarray(scale), keras.ops.convert_to_numpy(expected_scale))
    np.testing.assert_array_equal(np.asarray(values), keras.ops.convert_to_numpy(expected))
