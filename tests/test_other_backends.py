"""The parity subset (`-m backend_smoke`) re-run on the torch and tensorflow Keras backends.

Keras picks its backend once per process, so each backend runs in a child
pytest process. The subset covers text and vision forward passes, greedy
`generate` (one-token and multi-token decoder prompts, ragged batches) and
the embedder against `transformers`, and conversion from a bfloat16
checkpoint. `fit` has no reference in `transformers`: each child also runs
`test_fit_steps_write_their_result`, which writes its losses and weights to
a file, and the parent compares them with the same steps on JAX.
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

TESTS = Path(__file__).parent
RESULT_FOLDER = "T5GEMMA2_FIT_STEP_RESULTS"
BATCH = 2
DEMO_PROMPTS = 48


@functools.cache
def _fit_steps():
    """Two `fit` steps of a tiny vision model from fixed weights: text only, then images.

    The vision tower trains too, so the text-only step differentiates through
    a vision tower that saw no image. Returns the two losses, and every weight
    before and after the steps, by path.
    """
    from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    vision_encoder = T5Gemma2VisionEncoder(
        image_size=14,
        patch_size=7,
        hidden_dim=8,
        intermediate_dim=16,
        num_layers=1,
        num_heads=2,
        output_dim=16,
        mm_tokens_per_image=1,
        name="vision_encoder",
    )
    backbone = T5Gemma2Backbone(
        vocabulary_size=40,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_encoder_layers=1,
        num_decoder_layers=1,
        sliding_window=4,
        eoi_token_id=38,
        image_token_id=39,
        vision_encoder=vision_encoder,
    )
    rng = np.random.default_rng(0)
    for weight in sorted(backbone.weights, key=lambda w: w.path):
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))
    initial = {w.path: keras.ops.convert_to_numpy(w) for w in backbone.weights}
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    seq_2_seq_lm.train_vision_tower = True
    seq_2_seq_lm.compile(optimizer=keras.optimizers.SGD(0.5))

    encoder_ids = rng.integers(3, 36, (2 * BATCH, 7)).astype("int32")
    encoder_ids[BATCH, 2:5] = [37, 39, 38]  # one image in the first sample of the second batch
    decoder_ids = rng.integers(3, 36, (2 * BATCH, 5)).astype("int32")
    decoder_ids[:, 0] = 2
    x = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": (np.arange(7) < [[7], [5], [7], [6]]).astype("int32"),
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": (np.arange(5) < [[5], [3], [4], [5]]).astype("int32"),
    }
    labels = rng.integers(3, 36, (2 * BATCH, 5)).astype("int32")
    images = rng.normal(size=(BATCH, 1, 14, 14, 3)).astype("float32")

    losses = []
    text_only = {key: value[:BATCH] for key, value in x.items()}
    history = seq_2_seq_lm.fit(text_only, labels[:BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    losses.append(history.history["loss"][0])
    with_images = {**{key: value[BATCH:] for key, value in x.items()}, "images": images}
    history = seq_2_seq_lm.fit(with_images, labels[BATCH:], batch_size=BATCH, shuffle=False, verbose=0)
    losses.append(history.history["loss"][0])
    return np.array(losses), initial, {w.path: keras.ops.convert_to_numpy(w) for w in backbone.weights}


@functools.cache
def _demo_answers():
    """The bundled demo model's greedy answers to held-out prompts of its four tasks, images included."""
    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma import demo

    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(sampler="greedy")
    examples = demo.make_examples(["rotate", "reverse", "sort", "color"], DEMO_PROMPTS, seed=3, held_out=True)
    return np.array(demo.generate_answers(seq_2_seq_lm, examples)), np.array([e.target for e in examples])


@pytest.mark.backend_smoke
def test_fit_steps_and_demo_answers_write_their_result():
    """In a backend's child process: `fit` and the demo run, and their results go where the parent reads them."""
    losses, _, weights = _fit_steps()
    assert np.isfinite(losses).all()
    answers, _ = _demo_answers()
    assert all(answers), answers
    folder = os.environ.get(RESULT_FOLDER)
    if folder:
        np.savez(Path(folder) / f"{keras.config.backend()}.npz", losses=losses, demo_answers=answers, **weights)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_parity_subset_on_backend(backend, tmp_path):
    if keras.config.backend() != "jax":
        pytest.skip("launched from the JAX run only")
    environment = {**os.environ, "KERAS_BACKEND": backend, RESULT_FOLDER: str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "backend_smoke", "-p", "no:cacheprovider", str(TESTS)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed", summary), summary

    # `fit` on this backend equals `fit` on JAX within float32 rounding.
    theirs = dict(np.load(tmp_path / f"{backend}.npz"))
    # The demo model answers as on JAX (the README's claim), and the answers are not trivially equal.
    answers, targets = _demo_answers()
    np.testing.assert_array_equal(theirs.pop("demo_answers"), answers)
    assert (answers == targets).mean() > 0.5 and len(set(answers)) > DEMO_PROMPTS / 2
    losses, initial, weights = _fit_steps()
    np.testing.assert_allclose(theirs.pop("losses"), losses, rtol=1e-5)
    assert set(theirs) == set(weights)
    for path in sorted(weights):
        np.testing.assert_allclose(theirs[path], weights[path], atol=1e-5, rtol=1e-5, err_msg=path)
    # The steps moved the text stacks and, through the image, the vision tower's patch embedding.
    for part in ("decoder", "patch_embedding"):
        moved = max(np.abs(weights[p] - initial[p]).max() for p in weights if part in p)
        assert moved > 1e-3, part
