"""The toy tasks of the bundled demo preset, and exact-match scoring.

Text tasks write short digit sequences as text, e.g. `"reverse: 3 1 4"` ->
`"4 1 3"`, `"sort: 3 1 4"` -> `"1 3 4"`; `rotate` (`"1 4 3"`) is left out of
the preset's training for the command line's `demo` to teach. The image task
names the colour of a noisy, roughly uniform image: `"color:
<start_of_image>"` -> `"red"`.

Examples are drawn from a seeded NumPy generator, so a seed and a count always
give the same examples. A fixed eighth of all digit prompts (by a hash of the
prompt) is held out: training sets never contain them and held-out sets
contain only them, so held-out accuracy measures generalisation to unseen
sequences of every length.

Example:
```python
examples = make_examples(["reverse", "sort", "color"], count=20, seed=1, held_out=True)
seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
exact_match(generate_answers(seq_2_seq_lm, examples), examples)
```
"""

import dataclasses
import zlib

import numpy as np

# Each operation maps a digit list to the target digit list.
OPERATIONS = {
    "reverse": lambda digits: digits[::-1],
    "sort": sorted,
    "rotate": lambda digits: digits[1:] + digits[:1],
}
# Nominal RGB of each colour of the image task.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_PROMPT = "color: <start_of_image>"
# Source images are this small; the image converter resizes them to the model's size.
COLOR_IMAGE_SIZE = 8
MIN_DIGITS, MAX_DIGITS = 2, 8
HELD_OUT_BUCKETS = 8


@dataclasses.dataclass(frozen=True)
class Example:
    """One example: `image` is `None` or a uint8 `(H, W, 3)` array."""

    prompt: str
    target: str
    image: np.ndarray = None


def digit_prompt(operation, digits):
    return f"{operation}: " + " ".join(str(digit) for digit in digits)


def is_held_out(prompt):
    """Whether a digit prompt belongs to the held-out eighth."""
    return zlib.crc32(prompt.encode()) % HELD_OUT_BUCKETS == 0


def color_image(rng, color, size=COLOR_IMAGE_SIZE):
    """A `(size, size, 3)` uint8 image: the colour, shifted and with pixel noise."""
    base = np.asarray(COLORS[color], "float32") + rng.uniform(-25, 25, 3)
    pixels = base + rng.normal(0, 18, (size, size, 3))
    return np.clip(np.round(pixels), 0, 255).astype("uint8")


def make_examples(operations, count, seed, held_out=False, min_digits=MIN_DIGITS, max_digits=MAX_DIGITS):
    """`count` examples, the operations drawn uniformly.

    Args:
        operations: names from `OPERATIONS` and/or `"color"` (the image task);
            a name listed twice is drawn twice as often.
        count: int.
        seed: int, the NumPy generator's seed.
        held_out: bool, draw only held-out digit prompts (else only training ones).
        min_digits, max_digits: the range of sequence lengths.

    Returns:
        A list of `Example`s.
    """
    for operation in operations:
        if operation not in OPERATIONS and operation != "color":
            raise ValueError(f"Unknown operation `{operation}`; expected one of {[*OPERATIONS, 'color']}.")
    rng = np.random.default_rng(seed)
    examples = []
    while len(examples) < count:
        operation = operations[rng.integers(len(operations))]
        if operation == "color":
            color = list(COLORS)[rng.integers(len(COLORS))]
            examples.append(Example(COLOR_PROMPT, color, color_image(rng, color)))
            continue
        length = rng.integers(min_digits, max_digits + 1)
        while True:  # redraw the digits until the prompt is on the requested side of the split
            digits = [int(digit) for digit in rng.integers(0, 10, length)]
            prompt = digit_prompt(operation, digits)
            if is_held_out(prompt) == held_out:
                break
        target = " ".join(str(digit) for digit in OPERATIONS[operation](digits))
        examples.append(Example(prompt, target))
    return examples


def as_inputs(examples, image_slots=1):
    """Examples as `(x, targets)`: `x` is the preprocessor's dict, with a dense image array.

    Every sample gets `image_slots` image slots (dense arrays are what `fit`
    and `tf.data` take); samples without an image leave them unused.
    """
    images = np.zeros((len(examples), image_slots, COLOR_IMAGE_SIZE, COLOR_IMAGE_SIZE, 3), "uint8")
    for row, example in enumerate(examples):
        if example.image is not None:
            images[row, 0] = example.image
    x = {
        "encoder_text": [example.prompt for example in examples],
        "decoder_text": [example.target for example in examples],
        "images": images,
    }
    return x, [example.target for example in examples]


def generate_answers(seq_2_seq_lm, examples, max_length=16, batch_size=256):
    """The model's answers to examples, generated in batches with its compiled sampler.

    Image examples are generated with their image, text ones without images.
    """
    answers = [None] * len(examples)
    with_image = [i for i, example in enumerate(examples) if example.image is not None]
    text_only = [i for i, example in enumerate(examples) if example.image is None]
    for indices in (text_only, with_image):
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            inputs = {"encoder_text": [examples[i].prompt for i in batch]}
            if examples[batch[0]].image is not None:
                inputs["images"] = [[examples[i].image] for i in batch]
            for i, answer in zip(batch, seq_2_seq_lm.generate(inputs, max_length=max_length)):
                answers[i] = answer.strip()
    return answers


def exact_match(answers, examples):
    """Fraction of answers equal to their example's target."""
    return float(np.mean([answer == example.target for answer, example in zip(answers, examples)]))
