"""Scoring a sequence-to-sequence model on held-out input/target pairs: exact match, ROUGE, BLEU, chrF.

`evaluate(model_or_preset, data)` generates an answer for every input (greedy,
in batches of one compiled shape) and scores the answers against the targets.
The metrics come from maintained libraries, never re-implemented here:
`sacrebleu` (corpus BLEU and chrF, its default settings) and Google's
`rouge-score` (ROUGE-1, ROUGE-2 and ROUGE-L F-measures with its Porter stemmer,
averaged over the examples). Both are in the `eval` extra
(`pip install "keras-t5gemma[eval]"`); exact match needs nothing. Every score is
on a 0-100 scale, as sacrebleu reports BLEU.

In a multi-process JAX job (`multi_host=True`, or `keras.distribution.initialize`
called before) where each process holds a whole model, each process generates
for its own contiguous part of the data; the answers are gathered so that every
process returns the same result, in input order, and process 0 alone writes the
predictions file. A model sharded over the processes' devices (loaded under a
global distribution) generates every input on every process instead, as `generate`
needs the same batch on all of them.

Example:
```python
pairs = [("reverse: 1 2 3", "3 2 1"), ("sort: 3 1 2", "1 2 3")]
result = evaluate("t5gemma2_tiny_digits", pairs, metrics=["exact"], progress=False)
assert result.scores["exact"] == 100.0 and result.predictions == ["3 2 1", "1 2 3"]
print(result.table())
```
"""

import csv
import dataclasses
import json
import os
from pathlib import Path

import keras
import numpy as np

from keras_t5gemma.data import check_pairs
from keras_t5gemma.data import read_image
from keras_t5gemma.data import read_pairs
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import pil_image_to_rgb
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import START_OF_IMAGE_PIECE as IMAGE_MARKER
from keras_t5gemma.utils.safe_files import atomic_file

# Metric name -> the scores it reports; the last is the one `best_score_name` picks for the metric.
METRICS = {
    "exact": ("exact",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "bleu": ("bleu",),
    "chrf": ("chrf",),
}
DEFAULT_METRICS = tuple(METRICS)
INSTALL_EVAL = 'pip install "keras-t5gemma[eval]"'


@dataclasses.dataclass
class EvaluationResult:
    """What `evaluate` found.

    Attributes:
        scores: `{score name: value}` on a 0-100 scale, e.g. `{"exact": 87.5,
            "rouge1": 93.1, "rouge2": ..., "rougeL": ..., "bleu": ..., "chrf": ...}`.
        predictions: list of str, the model's answer to each input, in input order.
        inputs, targets: lists of str, the data's inputs and targets.
        generated: range, the examples this process generated (all of them
            but in a multi-process job that splits the data).
    """

    scores: dict
    predictions: list
    inputs: list
    targets: list
    generated: range

    def table(self):
        """The scores as a small text table, with the number of examples."""
        width = max(len("metric"), *map(len, self.scores))
        lines = [f"{'metric':<{width}}  score", f"{'-' * width}  ------"]
        lines += [f"{name:<{width}}  {value:6.2f}" for name, value in self.scores.items()]
        return "\n".join(lines + [f"({len(self.predictions)} examples)"])


def check_metrics(metrics):
    """The metric names as a tuple, checked, their libraries imported.

    Args:
        metrics: names from `METRICS`, as a list or one comma-separated string.

    Raises:
        ValueError: for an unknown or repeated name, or none.
        ImportError: when a metric's library is missing, naming the extra to install.
    """
    names = tuple(name.strip() for name in metrics.split(",")) if isinstance(metrics, str) else tuple(metrics)
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"metrics must be distinct names from {', '.join(METRICS)}; got {', '.join(names) or 'none'}")
    for name in names:
        _scorer(name)
    return names


def best_score_name(name, metrics):
    """The score that `keep_best=name` compares: a score name, or a metric's last score (`"rouge"` -> `"rougeL"`).

    Raises:
        ValueError: when `metrics` report no such score.
    """
    scores = [score for metric in check_metrics(metrics) for score in METRICS[metric]]
    chosen = METRICS[name][-1] if name in METRICS else name
    if chosen not in scores:
        raise ValueError(f"cannot keep the best by {name!r}: the metrics {', '.join(metrics)} report {scores}")
    return chosen


def _scorer(metric):
    """A function `(predictions, targets) -> {score name: value}` for one metric."""
    if metric == "exact":
        return lambda predictions, targets: {
            "exact": 100.0 * float(np.mean([p.strip() == t.strip() for p, t in zip(predictions, targets)]))
        }
    try:
        if metric == "rouge":
            from rouge_score import rouge_scorer
        else:
            import sacrebleu
    except ImportError as error:
        raise ImportError(f"the {metric!r} metric needs the `eval` extra: {INSTALL_EVAL} ({error})") from None
    if metric == "rouge":
        types = METRICS["rouge"]
        scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)

        def rouge(predictions, targets):
            found = [scorer.score(target, prediction) for prediction, target in zip(predictions, targets)]
            return {name: 100.0 * float(np.mean([scores[name].fmeasure for scores in found])) for name in types}

        return rouge
    corpus_score = sacrebleu.corpus_bleu if metric == "bleu" else sacrebleu.corpus_chrf
    return lambda predictions, targets: {metric: float(corpus_score(predictions, [targets]).score)}


def score(predictions, targets, metrics=DEFAULT_METRICS):
    """`{score name: value}` (0-100) of answers against targets, for each metric in `metrics`.

    Example:
    ```python
    assert score(["1 2 3", "4 5"], ["1 2 3", "5 4"], ["exact"]) == {"exact": 50.0}
    ```
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("nothing to score: no examples")
    predictions = [prediction.strip() for prediction in predictions]
    scores = {}
    for metric in check_metrics(metrics):
        scores.update(_scorer(metric)(predictions, targets))
    return scores


def read_examples(data):
    """`[(input, target, image or None)]` of a `.jsonl`/`.csv` file (`data.read_pairs`) or of in-memory pairs.

    In-memory pairs are `(input, target)` or `(input, target, image)` tuples, an
    image being a file path, a PIL image or `(H, W, 3)` uint8 pixels.

    Raises:
        ValueError: naming the file and line, or the example, that is wrong.
    """
    if isinstance(data, (str, os.PathLike)):
        return read_pairs(os.fspath(data), image_marker=IMAGE_MARKER)
    return check_pairs(data, image_marker=IMAGE_MARKER)


def _pixels(image):
    """RGB uint8 pixels of an image path, a PIL image or an array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = read_image(os.fspath(image))
    return pil_image_to_rgb(image) if isinstance(image, Image.Image) else np.asarray(image, "uint8")


def _load(preset):
    """The preset's task for generation, greedy: T5Gemma's for a first-generation preset, else T5Gemma 2's."""
    from keras_t5gemma.models.auto import load_seq_2_seq_lm

    seq_2_seq_lm = load_seq_2_seq_lm(preset)
    seq_2_seq_lm.compile(sampler="greedy")
    return seq_2_seq_lm


def _processes():
    """`(count, index)` of this process in the JAX job (`(1, 0)` on other backends)."""
    if keras.backend.backend() != "jax":
        return 1, 0
    import jax

    return jax.process_count(), jax.process_index()


def process_part(num_examples, model):
    """`(rows, sharded)`: the rows this process generates, its contiguous part when every process of a JAX
    job holds the whole model (`sharded`: `gather_texts` then puts the parts together), else all of them."""
    count, index = _processes()
    if count == 1 or not all(variable.value.is_fully_addressable for variable in model.weights):
        return range(num_examples), False
    per_process = -(-num_examples // count)
    return range(min(index * per_process, num_examples), min((index + 1) * per_process, num_examples)), True


def gather_texts(answers):
    """Every process' answers, concatenated in process order, on every process."""
    from jax.experimental import multihost_utils

    encoded = [answer.encode() for answer in answers]
    sizes = multihost_utils.process_allgather(np.array([len(encoded), max(map(len, encoded), default=0)], "int32"))
    rows, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    # Fixed-shape arrays travel: UTF-8 bytes padded to the longest answer, and each answer's length.
    text = np.zeros((rows, max(width, 1)), "uint8")
    lengths = np.zeros(rows, "int32")
    for row, value in enumerate(encoded):
        text[row, : len(value)] = np.frombuffer(value, "uint8")
        lengths[row] = len(value)
    texts, lengths = multihost_utils.process_allgather((text, lengths))
    return [
        bytes(texts[process, row, : lengths[process, row]]).decode()
        for process in range(len(sizes))
        for row in range(int(sizes[process, 0]))
    ]


def generate_answers(seq_2_seq_lm, examples, batch_size=32, max_length=None, progress=None):
    """The model's answer (stripped) to each `(input, target, image)` example, in order.

    Inputs with an image and inputs without are generated in separate
    batches; every batch has `batch_size` rows (the last one is filled with
    copies of its last input), so one compiled `generate` serves them all.

    Args:
        progress: a `keras.utils.Progbar` to advance by examples, or None.
    """
    answers = [None] * len(examples)
    groups = (
        [i for i, example in enumerate(examples) if example[2] is None],
        [i for i, example in enumerate(examples) if example[2] is not None],
    )
    done = 0
    for indices in groups:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            rows = batch + batch[-1:] * (batch_size - len(batch))
            prompts = [examples[i][0] for i in rows]
            inputs = {"encoder_text": prompts}
            if examples[rows[0]][2] is not None:
                inputs["encoder_text"] = [p if IMAGE_MARKER in p else f"{p} {IMAGE_MARKER}" for p in prompts]
                inputs["images"] = [[_pixels(examples[i][2])] for i in rows]
            generated = seq_2_seq_lm.generate(inputs, max_length=max_length)
            for i, answer in zip(batch, generated):
                answers[i] = answer.strip()
            done += len(batch)
            if progress is not None:
                progress.update(done)
    return answers


def check_predictions_path(path, overwrite=False):
    """Raises what writing the predictions to `path` would, before anything is generated."""
    if Path(path).suffix.lower() != ".jsonl":
        raise ValueError(f"the predictions file must end in .jsonl; got {path}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")


def write_predictions(path, result, overwrite=False):
    """Writes one JSON line per example, `{"input", "target", "prediction", "exact"}`, atomically."""
    check_predictions_path(path, overwrite)
    with atomic_file(path, "w", overwrite=overwrite, encoding="utf-8") as file:
        for text, target, prediction in zip(result.inputs, result.targets, result.predictions):
            record = {"input": text, "target": target, "prediction": prediction, "exact": prediction == target.strip()}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def evaluate(
    model_or_preset,
    data,
    metrics=DEFAULT_METRICS,
    batch_size=32,
    max_length=None,
    encoder_length=None,
    predictions_path=None,
    overwrite=False,
    multi_host=False,
    progress="auto",
):
    """Generates an answer to every input of `data` and scores the answers against the targets.

    Args:
        model_or_preset: a `T5Gemma2Seq2SeqLM` / `T5GemmaSeq2SeqLM` (generating
            with its compiled sampler), or a preset name, folder or `hf://`
            handle (loaded and compiled for greedy decoding).
        data: a `.jsonl` or `.csv` file of input/target pairs (see
            `keras_t5gemma.data.read_pairs`), or `(input, target)` /
            `(input, target, image)` tuples.
        metrics: names from `METRICS` (`"exact"`, `"rouge"`, `"bleu"`,
            `"chrf"`), a list or a comma-separated string.
        batch_size: int, inputs per `generate` call.
        max_length: int or None, the decoder length in tokens, `<bos>`
            included (default: the preprocessor's).
        encoder_length: int or None, the encoder length for this call
            (default: the preprocessor's).
        predictions_path: a `.jsonl` file to write each example's input,
            target and prediction to (atomically; process 0 only), or None.
        overwrite: bool, replace an existing `predictions_path`.
        multi_host: bool, join the other processes of the job first
            (`keras.distribution.initialize`); each then generates its part.
        progress: `"auto"` (a bar on a terminal), True or False.

    Returns:
        An `EvaluationResult`: the scores, the predictions in input order.

    Raises:
        ValueError: bad data (naming the file and line), unknown metrics, a
            predictions file that is not `.jsonl`.
        FileExistsError: `predictions_path` exists and `overwrite` is False.
        ImportError: a metric's library is missing (the message says what to install).
    """
    metrics = check_metrics(metrics)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if predictions_path is not None:
        check_predictions_path(predictions_path, overwrite)
    examples = read_examples(data)
    if multi_host:
        keras.distribution.initialize()
    seq_2_seq_lm = _load(model_or_preset) if isinstance(model_or_preset, (str, os.PathLike)) else model_or_preset
    preprocessor = seq_2_seq_lm.preprocessor
    max_length = max_length or preprocessor.decoder_sequence_length
    rows, sharded = process_part(len(examples), seq_2_seq_lm)
    _, index = _processes()
    bar = None
    if index == 0 and (progress is True or (progress == "auto" and os.isatty(1))):
        bar = keras.utils.Progbar(len(rows), unit_name="example")
    original_length = preprocessor.encoder_sequence_length
    if encoder_length:
        preprocessor.encoder_sequence_length = encoder_length
    try:
        answers = generate_answers(seq_2_seq_lm, [examples[i] for i in rows], batch_size, max_length, bar)
    finally:
        preprocessor.encoder_sequence_length = original_length
    if sharded:
        answers = gather_texts(answers)
    targets = [target for _, target, _ in examples]
    inputs = [text for text, _, _ in examples]
    result = EvaluationResult(score(answers, targets, metrics), answers, inputs, targets, rows)
    if predictions_path is not None and index == 0:
        write_predictions(predictions_path, result, overwrite)
    return result


# === A run's history: history.csv and curves.png ===


def read_history(path):
    """The rows of a `history.csv` (`write_history`), numbers as floats, `epoch` as int; `[]` if absent."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    return [{key: int(value) if key == "epoch" else float(value) for key, value in r.items() if value} for r in rows]


def write_history(path, rows):
    """Writes one CSV row per epoch (`epoch`, then every loss and score in order of first appearance), atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_file(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_history(rows):
    """A matplotlib `Figure` of the rows: losses per epoch on the left, evaluation scores (0-100) on the right.

    Made without `pyplot`, so it neither needs nor changes the session's
    backend (a notebook shows the figure inline by ending a cell with it).

    Raises:
        ImportError: without matplotlib, naming the extra to install.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(f"training curves need matplotlib: {INSTALL_EVAL} ({error})") from None
    epochs = [row["epoch"] for row in rows]
    names = list(dict.fromkeys(key for row in rows for key in row if key != "epoch"))
    panels = (
        ("loss", [name for name in names if name.endswith("loss")]),
        ("score (0-100)", [name for name in names if name.startswith("eval_")]),
    )
    panels = [panel for panel in panels if panel[1]]
    figure = Figure(figsize=(5 * max(len(panels), 1), 3.6), layout="constrained")
    for axes, (label, series) in zip(figure.subplots(1, max(len(panels), 1), squeeze=False)[0], panels):
        for name in series:
            points = [(row["epoch"], row[name]) for row in rows if name in row]
            axes.plot(*zip(*points), marker="o", label=name.removeprefix("eval_"))
        values = [row[name] for row in rows for name in series if name in row]
        if label == "loss" and min(values) > 0 and max(values) > 20 * min(values):
            axes.set_yscale("log")  # a loss falling by orders of magnitude stays readable
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"training curves, epochs {min(epochs)}-{max(epochs)}" if epochs else "training curves")
    return figure


def write_curves(path, rows):
    """Writes `plot_history(rows)` as a PNG (rendered by Agg), atomically."""
    figure = plot_history(rows)
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=100)
