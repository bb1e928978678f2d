"""The main job (`keras-t5gemma demo`): teach the bundled model `rotate` by fine-tuning, answers before and after.

Example:
```python
scores = run_demo(steps=2, eval_examples=2, verbose=0, say=lambda *args, **kwargs: None)
scores["before"], scores["after"]  # held-out exact match: (rotate, reverse/sort/color)
```
"""

import sys
import time

import keras

from keras_t5gemma.demo import as_inputs
from keras_t5gemma.demo import exact_match
from keras_t5gemma.demo import generate_answers
from keras_t5gemma.demo import make_examples
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import START_OF_IMAGE_PIECE
from keras_t5gemma.training.fine_tune import DEFAULT_PRESET
from keras_t5gemma.training.fine_tune import fit_verbosity
from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm


def _marks():
    """Correctness marks that the terminal can print."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "+", "x"


def run_demo(
    preset=DEFAULT_PRESET,
    steps=500,
    batch_size=32,
    learning_rate=2e-3,
    eval_examples=100,
    output=None,
    seed=0,
    verbose="auto",
    say=print,
):
    """Fine-tunes `preset` on `rotate` (replaying its known tasks) and reports held-out answers before and after.

    Args:
        preset: a preset trained on the demo's tasks (the bundled one by default).
        steps, batch_size, learning_rate: the fine-tuning (AdamW, all weights).
        eval_examples: held-out prompts per group (new operation, known ones).
        output: a folder to save the fine-tuned model to, or `None`.
        seed: examples, shuffling and initialisation.
        verbose: Keras `fit` verbosity, or `"auto"`.
        say: where the report's lines go (`print`'s signature).

    Returns:
        `{"before": (rotate, known), "after": (rotate, known)}`: held-out exact matches.
    """
    # Seed before anything builds a tokenizer: seeding clears TF's caches.
    keras.utils.set_random_seed(seed)
    right, wrong = _marks()
    started = time.time()
    seq_2_seq_lm = load_seq_2_seq_lm(preset)
    say("T5Gemma 2 demo: teach the bundled tiny model a new operation, `rotate`, by fine-tuning.")
    say(
        f"Preset {preset} ({seq_2_seq_lm.backbone.count_params():,} parameters), "
        f"loaded in {time.time() - started:.1f}s."
    )
    # Held-out prompts never appear in the fine-tuning data or the original training data.
    new = make_examples(["rotate"], eval_examples, seed=seed + 10, held_out=True)
    known = make_examples(["reverse", "sort", "color"], eval_examples, seed=seed + 11, held_out=True)
    # Two-digit rotations are reversals: show longer ones, and one example of each known task.
    showcase = [example for example in new if len(example.target) > 3][:3]
    for task in ("reverse", "sort", "color"):
        showcase += [example for example in known if example.prompt.startswith(task)][:1]
    # The demo's prompts and answers are short: pad to what they need, not to the preset's defaults.
    seq_2_seq_lm.preprocessor.encoder_sequence_length = 32
    seq_2_seq_lm.preprocessor.decoder_sequence_length = 16
    # One optimizer for the whole demo; compiling before generating keeps one compiled generate.
    seq_2_seq_lm.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01), sampler="greedy")

    def report(title):
        new_answers = generate_answers(seq_2_seq_lm, new)
        known_answers = generate_answers(seq_2_seq_lm, known)
        answers = dict(zip(map(id, new + known), new_answers + known_answers))
        say(f"\n{title}")
        for example in showcase:
            answer = answers[id(example)]
            prompt = example.prompt
            if example.image is not None:
                height, width, _ = example.image.shape
                prompt = prompt.replace(START_OF_IMAGE_PIECE, f"[{height}x{width} image, {example.target}]")
            mark = right if answer == example.target else f"{wrong} (expected {example.target})"
            say(f"  {prompt:<34} -> {answer:<18} {mark}")
        scores = (exact_match(new_answers, new), exact_match(known_answers, known))
        say(
            f"  held-out exact match: rotate {scores[0]:.0%} ({len(new)} prompts), "
            f"reverse/sort/color {scores[1]:.0%} ({len(known)} prompts)"
        )
        return scores

    before = report("Before fine-tuning (greedy decoding):")
    # Mostly the new operation, with the known ones replayed so they are not forgotten.
    train = make_examples(["rotate", "rotate", "reverse", "sort", "color"], steps * batch_size, seed=seed + 12)
    x, _ = as_inputs(train)
    say(
        f"\nFine-tuning all weights on {len(train):,} examples (60% rotate, the rest replayed), "
        f"{steps} steps of {batch_size}:"
    )
    tuning_started = time.time()
    seq_2_seq_lm.fit(x, batch_size=batch_size, epochs=1, shuffle=False, verbose=fit_verbosity(verbose))
    say(f"  done in {time.time() - tuning_started:.0f}s.")
    after = report("After fine-tuning:")
    if output:
        seq_2_seq_lm.save_to_preset(output)
        say(
            f'\nSaved the fine-tuned model to {output}; try `keras-t5gemma generate --preset {output} "rotate: 1 2 3"`.'
        )
    say(
        f"\nHeld-out exact match, before -> after: rotate {before[0]:.0%} -> {after[0]:.0%}, "
        f"reverse/sort/color {before[1]:.0%} -> {after[1]:.0%}. Total {time.time() - started:.0f}s."
    )
    return {"before": before, "after": after}
