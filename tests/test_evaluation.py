"""`keras_t5gemma.evaluation` and `keras-t5gemma evaluate`: scores from sacrebleu and rouge-score, the demo's
exact match, bad input, and the same result from two processes as from one.

The two-process test starts `python -m keras_t5gemma evaluate --multi-host` twice
(one virtual CPU device each, joined through JAX's coordinator on 127.0.0.1) and
compares process 0's table and predictions file with this process' `evaluate`.
"""

import json
import os
import shlex
import sys

import numpy as np
import pytest

from keras_t5gemma import demo
from keras_t5gemma import evaluation
from keras_t5gemma.cli import main
from keras_t5gemma.evaluation import evaluate
from keras_t5gemma.evaluation import score

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PRESET = "t5gemma2_tiny_digits"


def as_pairs(examples):
    return [(example.prompt, example.target, example.image) for example in examples]


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"input": e.prompt, "target": e.target}) + "\n" for e in examples))
    return path


@pytest.fixture(scope="module")
def seq_2_seq_lm():
    from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm

    model = load_seq_2_seq_lm(PRESET)
    model.compile(sampler="greedy")
    # The demo's lengths (`training/demo.py`).
    model.preprocessor.encoder_sequence_length = 32
    model.preprocessor.decoder_sequence_length = 16
    return model


# The demo's held-out prompts: the new operation (rotate) and the known ones, with images.
ROTATE = demo.make_examples(["rotate"], 24, seed=10, held_out=True)
ROTATE_PAIRS = [(example.prompt, example.target) for example in ROTATE]
KNOWN = demo.make_examples(["reverse", "sort", "color"], 24, seed=11, held_out=True)


def test_scores_are_the_libraries_own():
    predictions = ["the cat sat on the mat", "a quick brown fox", "3 2 1"]
    targets = ["the cat sat on a mat", "the quick brown fox jumps", "3 2 1"]
    scores = score(predictions, targets)
    assert list(scores) == ["exact", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]
    assert scores["exact"] == pytest.approx(100 / 3)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [targets]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [targets]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predictions, targets)])
    assert scores["rougeL"] == pytest.approx(100 * expected)
    assert 0 < scores["bleu"] < 100 and 0 < scores["rougeL"] < 100
    # Answers are compared without their surrounding spaces, as `generate`'s are printed.
    assert score([" 1 2 "], ["1 2"], ["exact"]) == {"exact": 100.0}


def test_bad_metrics_and_outputs_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="metrics must be distinct names from exact, rouge, bleu, chrf; got meteor"):
        score(["a"], ["a"], ["meteor"])
    with pytest.raises(ValueError, match="cannot keep the best by 'bleu'"):
        evaluation.best_score_name("bleu", ["exact", "rouge"])
    assert evaluation.best_score_name("rouge", ["rouge"]) == "rougeL"
    with pytest.raises(ValueError, match="must end in .jsonl"):
        evaluate(PRESET, [("a", "b")], metrics="exact", predictions_path=str(tmp_path / "out.txt"))
    existing = tmp_path / "mine.jsonl"
    existing.write_text("the user's\n")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        evaluate(PRESET, [("a", "b")], metrics="exact", predictions_path=str(existing))
    assert existing.read_text() == "the user's\n"
    with pytest.raises(ValueError, match="example 0: the input and the target must be strings"):
        evaluate(PRESET, [("a", 3)], metrics="exact")
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r'needs the `eval` extra: pip install "keras-t5gemma\[eval\]"'):
        score(["a"], ["a"], ["bleu"])


def test_the_command_reports_a_bad_data_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "sort: 2 1", "target": "1 2"}\n{"input": "sort: 3 1"}\n')
    assert main(["evaluate", str(data), "--metrics", "exact"]) == 2
    assert f"{data}, line 2: `target` must be a string" in capsys.readouterr().err


def test_evaluate_gives_the_demo_exact_match_with_images(seq_2_seq_lm, tmp_path):
    answers = demo.generate_answers(seq_2_seq_lm, KNOWN)
    result = evaluate(seq_2_seq_lm, as_pairs(KNOWN), metrics="exact,chrf", batch_size=8, progress=False)
    assert result.predictions == answers
    assert result.scores["exact"] == 100 * demo.exact_match(answers, KNOWN)
    assert result.inputs == [example.prompt for example in KNOWN]


@pytest.fixture(scope="module")
def rotate_result(seq_2_seq_lm, tmp_path_factory):
    """One process' evaluation of the rotate prompts, which the bundled preset mostly gets wrong."""
    folder = tmp_path_factory.mktemp("rotate")
    predictions = folder / "predictions.jsonl"
    result = evaluate(seq_2_seq_lm, as_pairs(ROTATE), batch_size=8, predictions_path=str(predictions), progress=False)
    return result, predictions


def test_evaluate_gives_the_demo_exact_match_on_rotate(seq_2_seq_lm, rotate_result):
    result, predictions = rotate_result
    answers = demo.generate_answers(seq_2_seq_lm, ROTATE)
    assert result.predictions == answers
    assert result.scores["exact"] == 100 * demo.exact_match(answers, ROTATE)
    assert 0 < result.scores["exact"] < 100, "the check needs right and wrong answers"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [record["prediction"] for record in records] == answers
    assert [record["exact"] for record in records] == [a == e.target for a, e in zip(answers, ROTATE)]


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax", reason="JAX processes only")
def test_two_processes_evaluate_as_one(rotate_result, tmp_path):
    from test_multihost import free_port
    from test_multihost import run_workers

    result, single_predictions = rotate_result
    data = write_jsonl(tmp_path / "rotate.jsonl", ROTATE)
    predictions = tmp_path / "predictions.jsonl"
    command = [sys.executable, "-m", "keras_t5gemma", "evaluate", str(data), "--multi-host", "--batch-size", "8"]
    command += ["--encoder-length", "32", "--max-length", "16", "--predictions", str(predictions), "--quiet"]
    address = f"127.0.0.1:{free_port()}"
    environments = [
        {
            "KERAS_BACKEND": "jax",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            # One device each; compiling fast matters more here than the code XLA makes.
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
            "--xla_llvm_disable_expensive_passes=true",
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": address,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            "KERAS_DISTRIBUTION_PROCESS_ID": str(process),
        }
        for process in range(2)
    ]
    # `generate --file --multi-host` in the same processes, after the evaluation.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{example.prompt}\n" for example in ROTATE))
    generate = [sys.executable, "-m", "keras_t5gemma", "generate", "--file", str(prompts), "--multi-host"]
    generate += ["--batch-size", "8", "--encoder-length", "32", "--max-length", "16"]
    both = ["bash", "-c", " ".join(map(shlex.quote, command)) + " && " + " ".join(map(shlex.quote, generate))]
    outputs = run_workers([both, both], tmp_path, environments)
    # Each process generated its half; process 0 alone printed the table and wrote the file.
    assert "Process 0 generated examples 1-12 of 24." in outputs[0]
    assert "Process 1 generated examples 13-24 of 24." in outputs[1]
    assert result.table() in outputs[0] and "metric" not in outputs[1]
    assert predictions.read_text() == single_predictions.read_text()
    # Process 0 printed every prompt's answer, in order: the single-process answers.
    assert "Process 1 generated prompts 13-24 of 24." in outputs[1]
    answers = [json.loads(line)["prediction"] for line in single_predictions.read_text().splitlines()]
    assert "\n".join(answers) in outputs[0] and answers[0] not in outputs[1]


def test_fine_tune_scores_every_epoch_keeps_the_best_and_draws_the_curves(tmp_path):
    from PIL import Image

    from keras_t5gemma.evaluation import read_history
    from keras_t5gemma.training.fine_tune import fine_tune

    train = demo.make_examples(["rotate", "rotate", "reverse", "sort"], 64, seed=12)
    lines = []
    options = dict(batch_size=16, learning_rate=2e-3, encoder_length=32, decoder_length=16, verbose=0, log=lines.append)
    with pytest.raises(ValueError, match="--keep-best compares scores on --eval data"):
        fine_tune(as_pairs(train), tmp_path / "refused", keep_best="exact", **options)
    with pytest.raises(ValueError, match="cannot keep the best by 'bleu'"):
        fine_tune(as_pairs(train), tmp_path / "refused", eval_data=ROTATE_PAIRS, eval_metrics="exact", keep_best="bleu")
    assert not (tmp_path / "refused").exists()
    evaluation_data = as_pairs(ROTATE[:16])
    result = fine_tune(
        [pair[:2] for pair in as_pairs(train)],
        tmp_path / "out",
        epochs=2,
        eval_data=evaluation_data,
        eval_metrics=["exact", "chrf"],
        keep_best="chrf",
        **options,
    )
    rows = read_history(os.path.join(result.run, "history.csv"))
    history = result.history.history
    assert [row["epoch"] for row in rows] == [1, 2]
    for name in ("loss", "eval_exact", "eval_chrf"):
        assert [row[name] for row in rows] == pytest.approx(history[name])
    # The last epoch's scores are the trained model's.
    final = evaluate(result.model, evaluation_data, ["exact", "chrf"], batch_size=16, progress=False)
    assert rows[-1]["eval_chrf"] == pytest.approx(final.scores["chrf"])
    best_epoch = 1 + int(np.argmax(history["eval_chrf"]))
    assert os.listdir(os.path.join(result.run, "best")) == [str(best_epoch)]
    assert any(f"Best chrf so far ({history['eval_chrf'][0]:.2f})" in line for line in lines)
    with Image.open(os.path.join(result.run, "curves.png")) as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] > 100
