"""int8 weight quantization through Keras `quantize`, on the bundled trained preset."""

import warnings

import keras
import numpy as np
import pytest

from keras_t5gemma import T5Gemma2Seq2SeqLM


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    digits = lambda: " ".join(str(d) for d in rng.integers(0, 10, rng.integers(2, 9)))  # noqa: E731
    return [f"{operation}: {digits()}" for operation in ["reverse", "sort"] * 20]


def _greedy(seq_2_seq_lm, inputs):
    on_ids = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    on_ids.compile(sampler="greedy")
    return on_ids.generate(inputs, stop_token_ids=None)["decoder_token_ids"]


def test_int8_generation_matches_float_greedy(prompts):
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    inputs = seq_2_seq_lm.preprocessor.generate_preprocess(prompts, sequence_length=20)
    expected = _greedy(seq_2_seq_lm, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq_2_seq_lm.quantize("int8")
    assert not [w for w in caught if "quantize" in str(w.message)]  # no per-layer noise
    kernel = seq_2_seq_lm.backbone.decoder.transformer_layers[0].feedforward.up_dense._kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
    table = seq_2_seq_lm.backbone.token_embedding.table
    assert table.quantization_mode == "int8"
    generated = _greedy(seq_2_seq_lm, inputs)
    agreement = (generated[:, 1:] == expected[:, 1:]).mean()
    assert agreement >= 0.95, agreement
    assert seq_2_seq_lm.generate(prompts[:2], max_length=20)  # strings in, strings out
