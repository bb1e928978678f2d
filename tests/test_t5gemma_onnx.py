"""ONNX export and the `t5gemma_onnx` runtime for the first T5Gemma family.

One tiny random checkpoint of `transformers`' `T5GemmaForConditionalGeneration`
(the config of `test_t5gemma.py`: the encoder wider, deeper and with more heads
than the decoder, attention-logit and final-logit soft caps the random logits
reach, windows shorter than the sequences), converted to Keras with a tokenizer
and exported once per module at every precision. Its widths (64 and 32) are
multiples of 32 so that the 4-bit tables export too.
"""

import json
import shutil

import keras
import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from test_onnx_export import _decoder_logits
from test_t5gemma import converted
from test_t5gemma import reference_model
from test_t5gemma import right_padded
from test_t5gemma import t5gemma_config

from keras_t5gemma.cli import main
from keras_t5gemma.export import export_onnx
from keras_t5gemma.export import onnx as onnx_export
from keras_t5gemma.export import onnx_graph
from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_embedder import T5GemmaEmbedder
from keras_t5gemma.models.t5gemma.t5gemma_embedder_preprocessor import T5GemmaEmbedderPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm_preprocessor import T5GemmaSeq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_tokenizer import T5GemmaTokenizer
from t5gemma_onnx import OnnxSeq2SeqLM

MAX_LENGTH = 10
PRECISIONS = ("fp32", "fp16", "int8", "q4", "q4f16")
# Largest logit difference from float32 as a fraction of the largest logit, on this random model (measured:
# fp16 2.7e-3, int8 0.06, q4 and q4f16 0.74: random weights, whose 4-bit error is large, as in BENCHMARKS'
# int4 rows; the logits are soft-capped at 3, so a graph computing something else differs by up to 2).
LOGIT_TOLERANCE = {"fp16": 1e-2, "int8": 0.15, "q4": 1.0, "q4f16": 1.0}
# The q4 graphs against float32 graphs of the weights their codes stand for (measured: q4 0.058, q4f16 0.057;
# int8 activations inside `MatMulNBits`, as int8's 0.06 above).
Q4_ACTIVATION_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def exported(small_proto, tmp_path_factory):
    """The reference model, the Keras task (with a tokenizer) and one export holding every precision."""
    config = t5gemma_config(encoder={"hidden_size": 64}, decoder={"hidden_size": 32})
    model = reference_model(config, seed=5)
    preprocessor = T5GemmaSeq2SeqLMPreprocessor(
        T5GemmaTokenizer(small_proto), encoder_sequence_length=24, decoder_sequence_length=MAX_LENGTH
    )
    seq_2_seq_lm = T5GemmaSeq2SeqLM(converted(model, config), preprocessor)
    seq_2_seq_lm.compile(sampler="greedy")
    folder = tmp_path_factory.mktemp("t5gemma_onnx")
    settings = export_onnx(seq_2_seq_lm, folder, precision=",".join(PRECISIONS))
    runtimes = {precision: OnnxSeq2SeqLM(folder, precision=precision) for precision in PRECISIONS}
    return model, seq_2_seq_lm, folder, settings, runtimes


def _decoder_ids(rng, batch, length):
    return np.concatenate([np.full((batch, 1), 2), rng.integers(3, 300, (batch, length - 1))], axis=1)


def test_logits_match_keras_and_transformers_soft_capped_unbalanced_padded(exported, rng):
    model, seq_2_seq_lm, _, settings, runtimes = exported
    assert settings["family"] == "t5gemma" and settings["cross_attention"] == "separate"
    assert (settings["hidden_dim"], settings["decoder_hidden_dim"]) == (64, 32)
    encoder_ids, encoder_mask = (array.astype("int64") for array in right_padded(rng, [11, 6], 11))
    decoder_ids = _decoder_ids(rng, 2, 9)
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor(encoder_ids),
            attention_mask=torch.tensor(encoder_mask),
            decoder_input_ids=torch.tensor(decoder_ids),
        )
    expected = reference.logits.numpy()
    # The soft cap (3) bounds the logits; the random model reaches it.
    assert 1.5 < np.abs(expected).max() < 3.0
    # Keras' logits equal these within the same tolerance (`test_t5gemma.py`); compared here against the
    # reference alone, which spares a compilation.
    scale = np.abs(expected).max()
    for step_by_step in (True, False):
        encoder_output, float32 = _decoder_logits(
            runtimes["fp32"], encoder_ids, encoder_mask, None, decoder_ids, step_by_step
        )
        assert_matches_reference(float32, expected, atol=1e-5 * scale, rtol_to_scale=1e-5)
    assert_matches_reference(encoder_output, reference.encoder_last_hidden_state.numpy(), mask=encoder_mask)
    for precision in PRECISIONS[1:]:
        _, logits = _decoder_logits(runtimes[precision], encoder_ids, encoder_mask, None, decoder_ids, False)
        error = np.abs(logits - float32).max() / scale
        print(f"{precision}: largest logit difference {error:.2g} of the largest logit")
        assert error < LOGIT_TOLERANCE[precision], (precision, error)


def _as_stored_in_4_bits(weights, key=None):
    """`model_weights` with every matmul kernel and table replaced by what its 4-bit codes stand for."""
    if isinstance(weights, dict):
        return {name: _as_stored_in_4_bits(value, name) for name, value in weights.items()}
    if isinstance(weights, list):
        return [_as_stored_in_4_bits(value) for value in weights]
    if not isinstance(weights, np.ndarray) or weights.ndim != 2:
        return weights
    # Tables are quantized along their rows `(V, D)`, kernels `(K, N)` along K.
    rows = weights if key == "table" else weights.T
    rounded = onnx_graph.dequantize_q4_rows(*onnx_graph.quantize_q4_rows(rows), rows.shape[1])
    return rounded if key == "table" else rounded.T


def test_4_bit_graphs_compute_what_float32_graphs_of_their_4_bit_weights_compute(exported, rng, tmp_path):
    """The q4 graphs against float32 graphs built from the weights their codes stand for: only `MatMulNBits`'
    int8 activations (`Q4_ACCURACY_LEVEL`) differ, so the 4-bit layout of every first-family weight (the
    cross-attention's encoder-wide kernels, both tables) is checked, where random weights' own 4-bit error
    is too large to tell."""
    _, seq_2_seq_lm, folder, _, runtimes = exported
    config = onnx_export.model_config(seq_2_seq_lm.backbone)
    weights = _as_stored_in_4_bits(onnx_export.model_weights(seq_2_seq_lm.backbone))
    with onnx_graph.WeightsFile(tmp_path / "weights.data") as weights_file:
        onnx_export.encoder_graph(weights, config).save(tmp_path / "encoder.onnx", weights_file)
        onnx_export.decoder_graph(weights, config, MAX_LENGTH).save(tmp_path / "decoder.onnx", weights_file)
    for name in (onnx_export.CONFIG_FILE, "tokenizer.spm"):
        shutil.copy(folder / name, tmp_path)
    encoder_ids, encoder_mask = (array.astype("int64") for array in right_padded(rng, [11, 6], 11))
    decoder_ids = _decoder_ids(rng, 2, 9)
    _, expected = _decoder_logits(OnnxSeq2SeqLM(tmp_path), encoder_ids, encoder_mask, None, decoder_ids, False)
    scale = np.abs(expected).max()
    for precision in ("q4", "q4f16"):
        _, logits = _decoder_logits(runtimes[precision], encoder_ids, encoder_mask, None, decoder_ids, False)
        error = np.abs(logits - expected).max() / scale
        print(f"{precision}: largest logit difference {error:.2g} from float32 graphs of its 4-bit weights")
        assert error < Q4_ACTIVATION_TOLERANCE, (precision, error)


def test_greedy_tokens_match_generate(exported):
    _, seq_2_seq_lm, _, _, runtimes = exported
    runtime = runtimes["fp32"]
    # Prompts laid out as the first family's preprocessor lays them out (`<start_of_image>` is plain text).
    prompts = ["The quick brown fox", "a <start_of_image> b", "Numbers 1 2 3 4 5 6"]
    keras_inputs = seq_2_seq_lm.preprocessor.generate_preprocess({"encoder_text": prompts})
    keras_ids = keras.ops.convert_to_numpy(keras_inputs["encoder_token_ids"])
    encoder_ids, encoder_mask, _ = runtime.encoder_inputs(prompts)
    np.testing.assert_array_equal(encoder_ids, keras_ids[:, : encoder_ids.shape[1]])
    # Every step to the cache's end (the random model's end token would stop some rows early).
    expected = seq_2_seq_lm.generate(prompts, stop_token_ids=None)
    tokens = runtime.generate_token_ids(encoder_ids, encoder_mask, stop_token_ids=None)["decoder_token_ids"]
    assert runtime.detokenize(tokens, np.ones_like(tokens)) == expected
    assert len(np.unique(tokens[:, 1:])) > 2  # the rows differ


def test_embeddings_match_the_embedder(exported):
    _, seq_2_seq_lm, _, _, runtimes = exported
    texts = ["The quick brown fox jumps", "Numbers"]
    preprocessor = T5GemmaEmbedderPreprocessor.from_seq_2_seq_preprocessor(seq_2_seq_lm.preprocessor)
    embedder = T5GemmaEmbedder(seq_2_seq_lm.backbone, preprocessor, pooling="mean", normalize=True)
    vectors = runtimes["fp32"].embed(texts)
    assert vectors.shape == (2, 64)  # the encoder's width
    assert_matches_reference(vectors, embedder.predict(texts, verbose=0), atol=1e-5, rtol_to_scale=1e-5)


def test_command_line_exports_a_checkpoint_folder_and_generates_from_it(exported, small_proto, tmp_path, capsys):
    model, _, _, _, runtimes = exported
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    (checkpoint / "tokenizer.model").write_bytes(small_proto)
    output = tmp_path / "onnx"
    argv = ["export", str(output), "--preset", str(checkpoint), "--format", "onnx", "--max-decode-length", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((output / "t5gemma2_onnx.json").read_text())["family"] == "t5gemma"
    capsys.readouterr()
    assert main(["generate", "--onnx", str(output), "The quick brown fox", "--max-length", "8"]) == 0
    # The module's export, whose tokens equal `generate`'s (`test_greedy_tokens_match_generate`).
    expected = runtimes["fp32"].generate("The quick brown fox", max_length=8)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_a_model_quantized_in_keras_is_refused_by_name(tmp_path):
    backbone = T5GemmaBackbone(
        vocabulary_size=40,
        encoder_hidden_dim=16,
        encoder_intermediate_dim=16,
        encoder_num_layers=1,
        encoder_num_heads=2,
        encoder_num_key_value_heads=1,
        encoder_head_dim=8,
        decoder_hidden_dim=8,
        decoder_intermediate_dim=16,
        decoder_num_layers=1,
        decoder_num_heads=1,
        decoder_num_key_value_heads=1,
        decoder_head_dim=8,
        sliding_window=2,
    )
    # One 4-bit layer (what `quantize("int4")` makes of every kernel) is enough to refuse the model.
    layer = backbone.decoder.transformer_layers[0].cross_attention.key_dense
    layer.quantize("int4")
    with pytest.raises(ValueError, match=f"`{layer.path}` is quantized \\(int4\\) in Keras.*precision="):
        export_onnx(T5GemmaSeq2SeqLM(backbone), tmp_path / "quantized", max_decode_length=4)
    assert not (tmp_path / "quantized").exists()
