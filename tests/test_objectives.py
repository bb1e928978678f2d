"""Continued-pretraining objectives (`keras_t5gemma.training.objectives`) and `fine_tune(objective=...)`."""

import collections
import json
import os
import re

import numpy as np
import pytest

from keras_t5gemma.training import objectives
from keras_t5gemma.training.input_pipeline import ExampleStream

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces,\tand tabs  and a trailing space ",
    "one",
    " ".join(f"w{i}" for i in range(300)),
]


def split_target(target):
    """`{sentinel number: span}` of a span-corruption target, checking that the sentinels count up from 0."""
    pieces = re.split(r"<unused(\d+)>", target)
    assert pieces[0] == ""
    numbers = [int(number) for number in pieces[1::2]]
    assert numbers == list(range(len(numbers)))
    return dict(zip(numbers, pieces[2::2]))


@pytest.mark.parametrize("denoiser", [d for d in objectives.UL2_DENOISERS if d.mean_span], ids=str)
def test_span_corruption_covers_every_word_once_and_reconstructs_the_text(denoiser):
    for seed in range(20):
        for text in TEXTS:
            source, target = denoiser(text, np.random.default_rng(seed))
            spans = split_target(target)
            kept = re.split(r"<unused\d+>", source)
            # The source holds the kept words in order, a sentinel where each span was; no word is in both.
            assert len(kept) == len(spans) + 1
            merged = "".join(piece for pair in zip(kept, [*spans.values(), ""]) for piece in pair)
            assert merged == text
            assert objectives.fill_sentinels(source, target) == text
            dropped = sum(len(objectives.words(span)) for span in spans.values())
            units = len(objectives.words(text))
            assert dropped == min(max(round(units * denoiser.rate), 1), units)
            assert all(span for span in spans.values())
    # On a long text the spans average the denoiser's mean length (within the rounding of their count).
    source, target = denoiser(TEXTS[3], np.random.default_rng(0))
    spans = split_target(target)
    corrupted = round(300 * denoiser.rate)
    assert len(spans) == max(round(corrupted / denoiser.mean_span), 1)


def test_prefix_lm_cuts_between_words():
    cuts = collections.Counter()
    for seed in range(200):
        source, target = objectives.prefix_lm(TEXTS[0], np.random.default_rng(seed))
        assert source + target == TEXTS[0] and source and target and source.endswith(" ")
        cuts[len(objectives.words(source))] += 1
    assert sorted(cuts) == list(range(1, 9))  # every cut point of the 9 words is drawn


def test_examples_are_deterministic_by_seed_epoch_and_place(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS[:2] * 5) + "\n\n")
    documents = [objectives.document_of_record(line, "", str(path)) for line in TEXTS[:2] * 5]
    batches = objectives.ObjectiveBatches("ul2", seed=1)
    keys = [(0, index) for index in range(10)]
    first = batches(documents, keys)
    assert first == objectives.ObjectiveBatches("ul2", seed=1)(documents, keys)
    assert first != objectives.ObjectiveBatches("ul2", seed=2)(documents, keys)
    assert first != batches(documents, [(1, index) for index in range(10)])
    # Each of the seven denoisers gets drawn.
    drawn = {batches.denoisers[np.random.default_rng([1, 0, i]).integers(7)].name for i in range(200)}
    assert drawn == {"R", "X", "S"}
    with pytest.raises(ValueError, match="must be one of prefix-lm, ul2"):
        objectives.ObjectiveBatches("mlm")
    # JSONL corpora: a `text` per record, bad records named by file and line.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    stream = ExampleStream(
        str(corpus),
        batch_size=1,
        shuffle_buffer=1,
        example=objectives.document_of_record,
        collate=objectives.ObjectiveBatches("prefix-lm"),
        suffixes=(".txt", ".jsonl"),
    )
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: expected an object with a string `text`"):
        list(stream.examples(0))


def test_continued_pretraining_on_the_demo_preset_lowers_the_loss(tmp_path):
    """Packed, as continued pretraining is run (`PackedStream`: each batch the next draws that fit its rows)."""
    from keras_t5gemma.training.fine_tune import fine_tune

    rng = np.random.default_rng(0)
    corpus = tmp_path / "digits.txt"
    # Counting runs: "3 4 5 6 7 8": a span or a suffix is predictable from the rest.
    corpus.write_text(
        "".join(" ".join(str((start + i) % 10) for i in range(8)) + "\n" for start in rng.integers(10, size=32))
    )
    result = fine_tune(
        str(corpus),
        tmp_path / "out",
        objective="ul2",
        pack=True,
        epochs=3,
        batch_size=8,
        learning_rate=3e-3,
        encoder_length=24,
        decoder_length=24,
        verbose=0,
        log=None,
    )
    losses = result.history.history["loss"]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    checkpoints = os.path.join(result.run, "checkpoints")
    steps = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    position = json.loads(open(os.path.join(checkpoints, f"{steps}.input.json")).read())
    # The last checkpoint: the end of the third epoch, numbered by the packed steps trained.
    assert (position["epoch"], position["example"], position["step"], position["pack_rows"]) == (3, 0, steps, 8)
