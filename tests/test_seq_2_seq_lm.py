"""`T5Gemma2Seq2SeqLM` on token ids: greedy parity with `transformers.generate`,
the cached decode path, compilation reuse, samplers, fit, LoRA and saving."""

import os
import warnings

import keras
import numpy as np
import pytest
import torch
from hf_reference import BOI
from hf_reference import EOI
from hf_reference import IMAGE
from hf_reference import backbone_from_reference
from hf_reference import reference_model
from hf_reference import tiny_config
from keras_hub import samplers

from keras_t5gemma.layers.transformer import TransformerStack
from keras_t5gemma.models.samplers import ArgmaxSampler
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pair():
    config = tiny_config(mm_tokens_per_image=4)
    model = reference_model(config, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = backbone_from_reference(model, config, text_only=False)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    seq_2_seq_lm.compile(sampler="greedy")
    return model, seq_2_seq_lm


def _encoder_batch(rng, lengths, images_per_sample=None, mm_tokens=4):
    """Right-padded encoder prompts; sample i gets `images_per_sample[i]` image blocks."""
    images_per_sample = images_per_sample or [0] * len(lengths)
    rows = []
    for n, images in zip(lengths, images_per_sample):
        ids = [2] + list(rng.integers(3, 290, n - 1))
        for _ in range(images):
            ids += [BOI] + [IMAGE] * mm_tokens + [EOI]
        rows.append(ids)
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], "int32")
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], "int32")
    return ids, mask


def _decoder_prompt(batch, length, prompt=(2,)):
    ids = np.zeros((batch, length), "int32")
    ids[:, : len(prompt)] = prompt
    mask = np.zeros((batch, length), "int32")
    mask[:, : len(prompt)] = 1
    return ids, mask


def _reference_generate(model, encoder_ids, encoder_mask, pixel_values=None):
    with torch.no_grad():
        return model.generate(
            input_ids=torch.tensor(encoder_ids).long(),
            attention_mask=torch.tensor(encoder_mask),
            pixel_values=pixel_values,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        ).numpy()


def _inputs(encoder_ids, encoder_mask, batch, images=None):
    decoder_ids, decoder_mask = _decoder_prompt(batch, NEW_TOKENS + 1)
    inputs = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": decoder_mask,
    }
    if images is not None:
        inputs["images"] = images
    return inputs


@pytest.mark.backend_smoke
def test_greedy_generation_of_ragged_text_prompts_matches_reference(pair, rng):
    model, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [12, 7, 3])
    expected = _reference_generate(model, encoder_ids, encoder_mask)
    output = seq_2_seq_lm.generate(_inputs(encoder_ids, encoder_mask, 3), stop_token_ids=None)
    np.testing.assert_array_equal(output["decoder_token_ids"], expected)
    assert len(np.unique(expected)) > 8  # not one repeated token


@pytest.mark.backend_smoke
def test_greedy_generation_from_ragged_multi_token_decoder_prompts_matches_reference(pair, rng):
    """Decoder prompts of several tokens (the prefill branch), of different lengths in one batch."""
    model, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [9, 12, 5])
    width = NEW_TOKENS + 1
    prompts = [[2] + list(rng.integers(3, 290, n - 1)) for n in (5, 3, 8)]
    decoder_ids = np.zeros((3, width), "int32")
    for row, prompt in enumerate(prompts):
        decoder_ids[row, : len(prompt)] = prompt
    inputs = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": (decoder_ids > 0).astype("int32"),
    }
    output = seq_2_seq_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    for row, prompt in enumerate(prompts):
        real = encoder_mask[row].astype(bool)
        with torch.no_grad():
            expected = model.generate(
                input_ids=torch.tensor(encoder_ids[row : row + 1, real]).long(),
                decoder_input_ids=torch.tensor([prompt]).long(),
                max_new_tokens=width - len(prompt),
                do_sample=False,
                eos_token_id=None,
            ).numpy()[0]
        np.testing.assert_array_equal(output[row], expected)


@pytest.mark.backend_smoke
def test_greedy_generation_with_images_matches_reference(pair, rng):
    model, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [5, 4], images_per_sample=[2, 1])
    images = rng.normal(size=(2, 2, 28, 28, 3)).astype("float32")
    pixel_values = torch.tensor(np.concatenate([images[0], images[1, :1]]).transpose(0, 3, 1, 2))
    expected = _reference_generate(model, encoder_ids, encoder_mask, pixel_values)
    output = seq_2_seq_lm.generate(_inputs(encoder_ids, encoder_mask, 2, images), stop_token_ids=None)
    np.testing.assert_array_equal(output["decoder_token_ids"], expected)
    without_images = seq_2_seq_lm.generate(
        _inputs(encoder_ids, encoder_mask, 2, np.zeros_like(images)), stop_token_ids=None
    )
    assert not np.array_equal(without_images["decoder_token_ids"], expected)


def test_ragged_decoder_prompts_continue_each_prompt(pair, rng):
    _, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 6])
    prompts = [(2, 40, 41, 42), (2, 50)]
    batch = _inputs(encoder_ids, encoder_mask, 2)
    for row, prompt in enumerate(prompts):
        batch["decoder_token_ids"][row, : len(prompt)] = prompt
        batch["decoder_padding_mask"][row, : len(prompt)] = 1
    together = seq_2_seq_lm.generate(batch, stop_token_ids=None)["decoder_token_ids"]
    for row, prompt in enumerate(prompts):
        alone = {key: value[row : row + 1] for key, value in batch.items()}
        expected = seq_2_seq_lm.generate(alone, stop_token_ids=None)["decoder_token_ids"][0]
        np.testing.assert_array_equal(together[row], expected)
        np.testing.assert_array_equal(together[row, : len(prompt)], prompt)


def test_stop_tokens_end_sequences_and_mask_the_rest(pair, rng):
    _, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [8, 5])
    free = seq_2_seq_lm.generate(_inputs(encoder_ids, encoder_mask, 2), stop_token_ids=None)["decoder_token_ids"]
    stop = int(free[0, 3])  # a token the first row produces at position 3
    output = seq_2_seq_lm.generate(_inputs(encoder_ids, encoder_mask, 2), stop_token_ids=(stop,))
    ids, mask = output["decoder_token_ids"], np.asarray(output["decoder_padding_mask"])
    first = list(ids[0]).index(stop, 1)
    assert mask[0, : first + 1].all() and not mask[0, first + 1 :].any()


def test_encoder_and_cross_key_values_run_once_per_call(pair, rng, monkeypatch):
    """Counted with JIT disabled, so the decode loop really runs in Python."""
    if keras.config.backend() != "jax":
        pytest.skip("uses jax.disable_jit")
    import jax

    _, seq_2_seq_lm = pair
    calls = {"encode": 0, "cross": 0, "steps": 0}

    def counting(name, method):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(T5Gemma2Backbone, "encode", counting("encode", T5Gemma2Backbone.encode))
    monkeypatch.setattr(TransformerStack, "cross_key_values", counting("cross", TransformerStack.cross_key_values))
    monkeypatch.setattr(TransformerStack, "call_with_cache", counting("steps", TransformerStack.call_with_cache))
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 4])
    inputs = _inputs(encoder_ids, encoder_mask, 2)
    steps = 4  # enough to tell once per call from once per step; each step runs op by op
    inputs["decoder_token_ids"], inputs["decoder_padding_mask"] = _decoder_prompt(2, steps + 1)
    with jax.disable_jit():
        seq_2_seq_lm.generate_step(inputs, stop_token_ids=None)
    assert calls == {"encode": 1, "cross": 1, "steps": steps}


@pytest.mark.backend_smoke
def test_second_call_with_the_same_shapes_does_not_recompile(pair, rng, monkeypatch):
    _, seq_2_seq_lm = pair
    seq_2_seq_lm.compile(sampler="greedy")  # a fresh compiled function
    traces = []
    original = T5Gemma2Seq2SeqLM.generate_step

    def traced(self, *args, **kwargs):
        traces.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T5Gemma2Seq2SeqLM, "generate_step", traced)
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 4])
    for _ in range(3):
        seq_2_seq_lm.generate(_inputs(encoder_ids, encoder_mask, 2), stop_token_ids=None)
    expected = 3 if keras.config.backend() == "torch" else 1  # torch runs the step eagerly each call
    assert len(traces) == expected


def _generate_with(backbone, sampler, inputs):
    model = T5Gemma2Seq2SeqLM(backbone)
    model.compile(sampler=sampler)
    return model.generate(inputs, stop_token_ids=None)["decoder_token_ids"]


@pytest.mark.parametrize(
    "sampler",
    [
        lambda: samplers.TopKSampler(k=1, seed=1),
        lambda: samplers.TopPSampler(p=1e-6, seed=1),
        lambda: samplers.BeamSampler(num_beams=1),
    ],
    ids=["top_k_1", "top_p_tiny", "beam_1"],
)
def test_samplers_narrowed_to_one_candidate_are_greedy(pair, rng, sampler):
    _, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 3])
    inputs = _inputs(encoder_ids, encoder_mask, 2)
    greedy = seq_2_seq_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    np.testing.assert_array_equal(_generate_with(seq_2_seq_lm.backbone, sampler(), inputs), greedy)


def test_top_k_samples_only_among_the_k_most_likely_tokens(pair, rng):
    """Each sampled token ranks below k in the logits of its prefix (teacher forced), and not always first."""
    _, seq_2_seq_lm = pair
    k = 3
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 3])
    inputs = _inputs(encoder_ids, encoder_mask, 2)
    output = _generate_with(seq_2_seq_lm.backbone, samplers.TopKSampler(k=k, seed=3), inputs)
    logits = seq_2_seq_lm.predict_on_batch(
        {**inputs, "decoder_token_ids": output, "decoder_padding_mask": np.ones_like(output)}
    )
    chosen = np.take_along_axis(logits[:, :-1], output[:, 1:, None], axis=-1)
    ranks = (logits[:, :-1] > chosen).sum(axis=-1)
    assert ranks.max() < k, ranks
    assert ranks.max() > 0, "only the most likely token was ever sampled"


def test_a_seeded_random_sampler_reproduces_its_tokens(pair, rng):
    _, seq_2_seq_lm = pair
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 3])
    inputs = _inputs(encoder_ids, encoder_mask, 2)
    first, again, other = (
        _generate_with(seq_2_seq_lm.backbone, samplers.RandomSampler(seed=seed), inputs) for seed in (5, 5, 6)
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (first[:, 0] == 2).all() and (first >= 0).all() and (first < 300).all()


def test_greedy_takes_the_argmax_of_the_logits_as_keras_hub_greedy_does(pair, rng):
    from keras_hub.samplers import GreedySampler

    from keras_t5gemma.models.samplers import ArgmaxSampler

    _, seq_2_seq_lm = pair
    assert type(seq_2_seq_lm.sampler) is ArgmaxSampler
    model = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    model.compile(sampler=GreedySampler())  # softmax, then argmax
    encoder_ids, encoder_mask = _encoder_batch(rng, [7, 3, 5])
    inputs = _inputs(encoder_ids, encoder_mask, 3)
    ours = seq_2_seq_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    keras_hub = model.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    np.testing.assert_array_equal(ours, keras_hub)


def test_first_argmax_is_numpys_argmax_with_ties_and_nan(rng):
    """The two-reduction argmax of greedy decoding, streaming and the accuracy metric: the first of equal maxima."""
    from keras_t5gemma.models.samplers import first_argmax

    x = rng.standard_normal((3, 4, 1000)).astype("float32")
    x[0, 0, [5, 9]] = np.nan  # the first NaN, as argmax gives
    x[1, 1] = 0.0  # all equal: index 0
    x[2, 2, [17, 600]] = 50.0  # a tie: the first
    x[2, 3, -1] = 50.0  # the last index
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(first_argmax(x)), np.argmax(x, axis=-1))


def _pairs_task(rng, examples=16, length=4):
    """Random encoder/target pairs over a 10-token alphabet, for a tiny model to memorise."""
    encoder = rng.integers(3, 13, (examples, length)).astype("int32")
    target = rng.integers(3, 13, (examples, length)).astype("int32")
    decoder_in = np.concatenate([np.full((examples, 1), 2), target], axis=1).astype("int32")
    labels = np.concatenate([target, np.full((examples, 1), 1)], axis=1).astype("int32")
    x = {
        "encoder_token_ids": encoder,
        "encoder_padding_mask": np.ones_like(encoder),
        "decoder_token_ids": decoder_in,
        "decoder_padding_mask": np.ones_like(decoder_in),
    }
    return x, labels


def _tiny_backbone(**kwargs):
    return T5Gemma2Backbone(
        vocabulary_size=16,
        hidden_dim=32,
        intermediate_dim=64,
        num_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
        sliding_window=8,
        eoi_token_id=14,
        image_token_id=15,
        **kwargs,
    )


def test_fit_learns_a_toy_task_and_then_generates_it(rng):
    keras.utils.set_random_seed(0)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(_tiny_backbone())
    seq_2_seq_lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    x, y = _pairs_task(rng)
    loss_before = seq_2_seq_lm.evaluate(x, y, verbose=0)[0]
    steps = 100  # one epoch over the pairs repeated, to skip per-epoch overhead
    repeated_x = {key: np.tile(value, (steps, 1)) for key, value in x.items()}
    seq_2_seq_lm.fit(repeated_x, np.tile(y, (steps, 1)), batch_size=16, shuffle=False, verbose=0)
    loss_after = seq_2_seq_lm.evaluate(x, y, verbose=0)[0]
    assert loss_after < loss_before / 5, (loss_before, loss_after)
    prompt = dict(x)
    prompt["decoder_token_ids"], prompt["decoder_padding_mask"] = _decoder_prompt(16, 6)
    generated = seq_2_seq_lm.generate(prompt, stop_token_ids=None)["decoder_token_ids"]
    assert (generated[:, 1:] == y).all(axis=1).mean() >= 15 / 16, generated


def test_lora_trains_only_the_adapters_which_save_and_load_alone(rng, tmp_path):
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(_tiny_backbone())
    seq_2_seq_lm.backbone.enable_lora(2)
    trainable = {w.path for w in seq_2_seq_lm.trainable_weights}
    assert trainable and all("lora" in path for path in trainable)
    frozen = {w.path: keras.ops.convert_to_numpy(w) for w in seq_2_seq_lm.weights if "lora" not in w.path}
    seq_2_seq_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y = _pairs_task(rng)
    seq_2_seq_lm.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for weight in seq_2_seq_lm.weights:
        if weight.path in frozen:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), frozen[weight.path])
    lora_b = [w for w in seq_2_seq_lm.weights if "lora_kernel_b" in w.path]
    assert any(np.abs(keras.ops.convert_to_numpy(w)).max() > 0 for w in lora_b)

    # The trained adapters alone (`save_lora_weights`) restore the model on the same base weights.
    path = os.path.join(tmp_path, "adapters.lora.h5")
    seq_2_seq_lm.backbone.save_lora_weights(path)
    backbone = T5Gemma2Backbone.from_config(seq_2_seq_lm.backbone.get_config())
    backbone.enable_lora(2)
    for ours, theirs in zip(backbone.weights, seq_2_seq_lm.backbone.weights):
        if "lora" not in theirs.path:
            ours.assign(theirs)
    backbone.load_lora_weights(path)
    restored = T5Gemma2Seq2SeqLM(backbone)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(seq_2_seq_lm(x)))


def test_keras_file_round_trip_is_exact(pair, rng, tmp_path):
    _, seq_2_seq_lm = pair
    path = os.path.join(tmp_path, "model.keras")
    seq_2_seq_lm.save(path)
    with warnings.catch_warnings():
        # Restoring `compile` (the sampler included) must not warn that it was skipped.
        warnings.filterwarnings("error", message=".*compile")
        restored = keras.saving.load_model(path)
    assert restored.compiled and type(restored.sampler) is type(seq_2_seq_lm.sampler) is ArgmaxSampler
    assert restored.get_compile_config() == seq_2_seq_lm.get_compile_config()
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 4], images_per_sample=[1, 0])
    inputs = _inputs(encoder_ids, encoder_mask, 2, rng.normal(size=(2, 1, 28, 28, 3)).astype("float32"))
    np.testing.assert_array_equal(seq_2_seq_lm.predict_on_batch(inputs), restored.predict_on_batch(inputs))


@pytest.mark.backend_smoke
def test_train_and_predict_without_images_on_a_vision_model(pair, rng):
    _, seq_2_seq_lm = pair
    model = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    encoder_ids, encoder_mask = _encoder_batch(rng, [6, 4])
    decoder_ids, decoder_mask = _decoder_prompt(2, 4, prompt=(2, 5, 6))
    x = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": decoder_mask,
    }
    loss = model.train_on_batch(x, decoder_ids)
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(model.predict_on_batch(x), keras.ops.convert_to_numpy(model(x)), atol=1e-5)
