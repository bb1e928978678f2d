"""Continued pretraining on raw text: input/target pairs drawn from documents by the T5Gemma papers' denoisers.

T5Gemma adapts a decoder-only Gemma into an encoder-decoder by further
pretraining with either PrefixLM or UL2 (Zhang et al., 2025, "Encoder-Decoder
Gemma: Improving the Quality-Efficiency Trade-Off via Adaptation",
arXiv:2504.06225); T5Gemma 2 follows the same recipe via UL2 (Zhang et al.,
2025, "T5Gemma 2: Seeing, Reading, and Understanding Longer",
arXiv:2512.14856). `fine_tune(objective=...)` does the same on a user's
corpus, to adapt a released model to a domain before task fine-tuning:

- `"prefix-lm"`: UL2's S-denoiser (Tay et al., 2023, "UL2: Unifying Language
  Learning Paradigms", arXiv:2205.05131, section 3.1.2): the document is cut at
  a point drawn uniformly, the prefix is the input and the rest the target.
- `"ul2"`: UL2's mixture of denoisers (section 3.1.3): span corruption with
  R-denoisers (mean span 3 and 8, 15% of the text corrupted), X-denoisers
  (mean span 3 and 8 at 50%, 64 at 15% and at 50%) and the S-denoiser; each
  example draws one of the seven uniformly (`UL2_DENOISERS`). Span corruption
  is T5's (Raffel et al., 2020, "Exploring the Limits of Transfer Learning",
  section 3.1.4): the number of corrupted units is `round(length * rate)`,
  split into `round(corrupted / mean_span)` spans of random positive lengths,
  interleaved with as many uncorrupted spans; each corrupted span is replaced
  in the input by a sentinel, and the target lists each sentinel followed by
  the span it replaced.

What differs from the papers, and why:
- Units are whitespace-separated words (each keeping the whitespace after it),
  not tokens: the input and the target stay text that the preprocessor
  tokenizes as it does every pair, and cutting between words never splits a
  token. Rates and span lengths are counted in words.
- Sentinels: T5's vocabulary has `<extra_id_N>`; T5Gemma 2's (Gemma 3's) has
  none, but it has 6,242 unused pieces `<unused0>` ... `<unused6241>`, each a
  single token that plain text maps to. Span `i` is marked `<unusedI>`. (In a
  vocabulary without them, such as the demo preset's, the marker is spelled
  out in several pieces; it still works, at the cost of length.)
- UL2's mode tokens (`[NLU]`, `[NLG]`, `[S2S]`) are not added: the T5Gemma
  papers do not say that their checkpoints use them.
- T5's final sentinel at the end of the target is left out: the target's
  `<eos>` ends it.

A document is one non-blank line of a `.txt` file or the `text` of a JSONL
record. What is drawn for a document depends only on the seed, the epoch and
the document's place in the epoch (`ObjectiveBatches`), so that a resumed run
draws the same examples.

Example:
```python
import numpy as np

text = "the quick brown fox jumps over the lazy dog"
source, target = span_corruption(text, mean_span=3, rate=0.3, rng=np.random.default_rng(0))
assert fill_sentinels(source, target) == text
source, target = prefix_lm(text, np.random.default_rng(0))
assert source + target == text
```
"""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

# A word and the whitespace after it; leading whitespace is a unit of its own.
_UNITS = re.compile(r"\s+|\S+\s*")
_SENTINEL = re.compile(r"<unused(\d+)>")


def sentinel(index):
    """The marker of corrupted span `index`: a single piece of Gemma 3's vocabulary."""
    return f"<unused{index}>"


def words(text):
    """The units of `text`: each word with the whitespace after it (`"".join(words(text)) == text`)."""
    units = _UNITS.findall(text)
    if len(units) > 1 and not units[0].strip():
        units[1] = units[0] + units[1]  # leading whitespace stays with the first word
        units = units[1:]
    return units


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One of UL2's denoisers: span corruption (`mean_span`, `rate`) or, with `mean_span=None`, prefix LM."""

    name: str
    mean_span: float | None = None
    rate: float = 0.0

    def __call__(self, text, rng):
        if self.mean_span is None:
            return prefix_lm(text, rng)
        return span_corruption(text, self.mean_span, self.rate, rng)


PREFIX_LM = Denoiser("S")
# UL2's seven denoisers (section 3.1.3), drawn uniformly.
UL2_DENOISERS = (
    Denoiser("R", 3, 0.15),
    Denoiser("R", 8, 0.15),
    Denoiser("X", 3, 0.5),
    Denoiser("X", 8, 0.5),
    Denoiser("X", 64, 0.15),
    Denoiser("X", 64, 0.5),
    PREFIX_LM,
)
OBJECTIVES = {"prefix-lm": (PREFIX_LM,), "ul2": UL2_DENOISERS}


def prefix_lm(text, rng):
    """`(input, target)`: `text` cut between two words at a point drawn uniformly (one word: an empty input)."""
    units = words(text)
    cut = int(rng.integers(1, len(units))) if len(units) > 1 else 0
    return "".join(units[:cut]), "".join(units[cut:])


def _random_lengths(total, parts, rng):
    """`parts` positive lengths adding up to `total`, drawn uniformly among such splits (T5's segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff([0, *cuts, total]).tolist()


def span_corruption(text, mean_span, rate, rng):
    """`(input, target)`: spans of `text` (about `rate` of its words, `mean_span` words long on average) replaced by
    sentinels in the input and listed after their sentinels in the target.

    A text of one word is corrupted whole.
    """
    units = words(text)
    length = len(units)
    if length == 0:
        return "", ""
    corrupted = min(max(int(round(length * rate)), 1), length)
    spans = min(max(int(round(corrupted / mean_span)), 1), corrupted, max(length - corrupted, 1))
    noise = _random_lengths(corrupted, spans, rng)
    # Uncorrupted spans before each corrupted one; the first may be empty when everything is corrupted.
    kept = _random_lengths(length - corrupted, spans, rng) if length > corrupted else [0] * spans
    source, target, start = [], [], 0
    for index, (keep, drop) in enumerate(zip(kept, noise)):
        source.extend(units[start : start + keep])
        start += keep
        source.append(sentinel(index))
        target.extend([sentinel(index), *units[start : start + drop]])
        start += drop
    source.extend(units[start:])
    return "".join(source), "".join(target)


def fill_sentinels(source, target):
    """The text that `span_corruption` made `(source, target)` of: each sentinel replaced by its span."""
    pieces = _SENTINEL.split(target)
    spans = {int(number): span for number, span in zip(pieces[1::2], pieces[2::2])}
    return _SENTINEL.sub(lambda match: spans[int(match.group(1))], source)


def document_of_record(record, where, path):
    """A `.txt` line, or the `text` of a JSONL record (see `keras_t5gemma.data.stream_records`)."""
    if Path(path).suffix.lower() == ".txt":
        return record
    try:
        value = json.loads(record)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise ValueError(f"{where}: expected an object with a string `text`")
    return value["text"]


class ObjectiveBatches:
    """`ExampleStream`'s `collate` for documents: each drawn into an `(input, target)` pair by a denoiser.

    The denoiser and its draws come from a generator seeded with
    `(seed, epoch, index)`, the document's place in the epoch: the same
    document is drawn differently each epoch, and identically when a run
    resumes.

    Args:
        objective: `"prefix-lm"` or `"ul2"` (`OBJECTIVES`).
        seed: int.
    """

    def __init__(self, objective, seed=0):
        if objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        self.denoisers, self.seed = OBJECTIVES[objective], seed

    def pair(self, text, key):
        rng = np.random.default_rng([self.seed, *key])
        return self.denoisers[int(rng.integers(len(self.denoisers)))](text, rng)

    def __call__(self, documents, keys):
        pairs = [self.pair(text, key) for text, key in zip(documents, keys)]
        return {"encoder_text": [source for source, _ in pairs], "decoder_text": [target for _, target in pairs]}
