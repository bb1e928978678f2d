"""int8 weight quantization through Keras `quantize`, on the bundled trained preset."""

import warnings

import keras
import pytest

from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import demo

# Held-out prompts of the preset's three tasks (BENCHMARKS.md's int8 claim), images included.
HELD_OUT = 150


@pytest.fixture(scope="module")
def examples():
    return demo.make_examples(["reverse", "sort", "color"], HELD_OUT, seed=21, held_out=True)


def _answers(seq_2_seq_lm, examples):
    """Greedy answers, all prompts in one batch (one compiled `generate`); text-only ones have no image."""
    inputs = {
        "encoder_text": [example.prompt for example in examples],
        "images": [[] if example.image is None else [example.image] for example in examples],
    }
    return [answer.strip() for answer in seq_2_seq_lm.generate(inputs, max_length=16)]


def test_int8_answers_equal_float32_answers_on_held_out_prompts(examples):
    """Answers are compared whole, so tokens count up to the end token and not after it."""
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(sampler="greedy")
    expected = _answers(seq_2_seq_lm, examples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq_2_seq_lm.quantize("int8")
    assert not [w for w in caught if "quantize" in str(w.message)]  # no per-layer noise
    kernel = seq_2_seq_lm.backbone.decoder.transformer_layers[0].feedforward.gate_up_dense._kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
    table = seq_2_seq_lm.backbone.token_embedding.table
    assert table.quantization_mode == "int8"
    seq_2_seq_lm.compile(sampler="greedy")
    answers = _answers(seq_2_seq_lm, examples)
    assert sum(example.image is not None for example in examples) > 0
    disagreements = [(e.prompt, a, b) for e, a, b in zip(examples, expected, answers) if a != b]
    assert not disagreements, disagreements
    # Not vacuous: float32 answers the held-out prompts right (the preset's recorded 100%).
    assert demo.exact_match(expected, examples) == 1.0
