"""bfloat16 and int8 greedy answers against float32 on the demo preset's held-out prompts, batch 1 included.

Batch 1 runs the one-row path of `keras_t5gemma.layers.projections` on the
JAX CPU backend; larger batches run Keras' own arithmetic.
"""

import json

import pytest

from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import demo
from keras_t5gemma.utils.preset_utils import resolve_preset

PRESET = "t5gemma2_tiny_digits"


@pytest.fixture(scope="module")
def held_out():
    with open(f"{resolve_preset(PRESET)}/metadata.json") as file:
        settings = json.load(file)["training"]["held_out"]
    operations = [operation for operation in settings["operations"] if operation != "color"]
    return demo.make_examples(operations, 24, settings["seed"], held_out=True)


def _answers(seq_2_seq_lm, examples, batch_size):
    seq_2_seq_lm.compile(sampler="greedy")
    return demo.generate_answers(seq_2_seq_lm, examples, batch_size=batch_size)


@pytest.fixture(scope="module")
def float32_answers(held_out):
    return _answers(T5Gemma2Seq2SeqLM.from_preset(PRESET), held_out, len(held_out))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_low_precision_greedy_answers_agree_with_float32(held_out, float32_answers, precision):
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(PRESET, dtype="bfloat16" if precision == "bfloat16" else None)
    if precision == "int8":
        seq_2_seq_lm.quantize("int8")
    in_batch = _answers(seq_2_seq_lm, held_out, len(held_out))
    one_by_one = _answers(seq_2_seq_lm, held_out[:6], 1)
    agreement = sum(a == b for a, b in zip(in_batch, float32_answers)) / len(held_out)
    print(f"{precision}: {agreement:.0%} of {len(held_out)} held-out answers agree with float32")
    assert agreement >= 0.9, (precision, agreement)
    assert one_by_one == in_batch[:6]
