"""Keras precisions against float32: int8, int4 (and GPTQ-calibrated 4-bit on the demo preset).

    python benchmarks/precision.py                             # 270m-270m, 2 interleaved rounds
    python benchmarks/precision.py --config tiny --rounds 1    # quick
    python benchmarks/precision.py --checkpoint /tmp/ckpt_270m # reuse (written there when absent)

Writes one random float32 `transformers` checkpoint of the config (the
released 270m-270m by default), then, each load in a child process of its own
and the precisions interleaved (float32, int8, int4, float32, int8, int4,
...), loads `T5Gemma2Backbone.from_preset(checkpoint, text_only=True,
quantize=mode)` (int8 and int4 straight from the float checkpoint, no float
copy) and reports:

- the peak resident memory while loading, above the child's baseline after
  imports and the backend's start (VmHWM);
- the resident weight bytes (every variable at its dtype; int4 packs two
  values per byte and keeps a float32 scale and an int8 zero point per block
  of 128 inputs);
- greedy decode tokens/s at batch 1 and 8 (64-token prompts, `--new-tokens`
  new tokens, the second call timed), medians over the rounds;
- the logit error against float32 on one teacher-forced batch (largest
  absolute difference over the largest float32 logit) and the share of
  positions where the top token agrees.

Then, in one more child, the greedy agreement with float32 on the bundled
demo preset's held-out prompts (text and image), for int8, int4 and 4-bit
GPTQ calibrated on the demo's training prompts
(`T5Gemma2Seq2SeqLM.gptq_quantize`), when that is available.

Timings are only comparable within one run on one machine; the script
prints the load average next to them.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

PRECISIONS = ("float32", "int8", "int4")
PROMPT_TOKENS = 64
TEACHER_TOKENS = 32


def _generate_inputs(batch, new_tokens, vocabulary):
    encoder = _common.prompts(batch, PROMPT_TOKENS, vocabulary)
    decoder = np.zeros((batch, new_tokens + 1), "int32")
    decoder[:, 0] = 2
    return {
        "encoder_token_ids": encoder,
        "encoder_padding_mask": np.ones_like(encoder),
        "decoder_token_ids": decoder,
        "decoder_padding_mask": (decoder > 0).astype("int32"),
    }


def child(precision, checkpoint, new_tokens, logits_path):
    import keras

    from keras_t5gemma import T5Gemma2Backbone
    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma.utils.loading import model_bytes

    keras.ops.convert_to_numpy(keras.ops.zeros((1,)))  # the backend starts before the baseline
    _common.reset_peak_rss()
    baseline = _common.current_rss()
    started = time.perf_counter()
    quantize = None if precision == "float32" else precision
    backbone = T5Gemma2Backbone.from_preset(checkpoint, text_only=True, quantize=quantize, progress=False)
    results = {
        "load_s": time.perf_counter() - started,
        "peak_load_bytes": _common.peak_rss() - baseline,
        "weight_bytes": model_bytes(backbone),
    }
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone, preprocessor=None)
    seq_2_seq_lm.compile(sampler="greedy")
    for batch in (1, 8):
        inputs = _generate_inputs(batch, new_tokens, backbone.vocabulary_size)
        seq_2_seq_lm.generate(inputs, stop_token_ids=None)  # compiles
        started = time.perf_counter()
        seq_2_seq_lm.generate(inputs, stop_token_ids=None)
        results[f"decode_tokens_per_s_b{batch}"] = batch * new_tokens / (time.perf_counter() - started)
    encoder = _common.prompts(4, PROMPT_TOKENS, backbone.vocabulary_size, seed=7)
    decoder = _common.prompts(4, TEACHER_TOKENS, backbone.vocabulary_size, seed=8)
    logits = seq_2_seq_lm.predict(_common.training_inputs(encoder, decoder), verbose=0)
    np.save(logits_path, np.asarray(logits, "float32"))
    _common.print_results(results)


def agreement_child():
    """Greedy agreement with float32 on the demo preset's held-out prompts, per precision."""
    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma import demo

    examples = demo.make_examples(["reverse", "sort", "color"], 300, seed=21, held_out=True)
    calibration = demo.make_examples(["reverse", "sort", "color"], 128, seed=5)
    results = {}
    reference = None
    for precision in ("float32", "int8", "int4", "gptq"):
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
        if precision == "gptq":
            if not hasattr(seq_2_seq_lm, "gptq_quantize"):
                continue
            seq_2_seq_lm.gptq_quantize(calibration)
        elif precision != "float32":
            seq_2_seq_lm.quantize(precision)
        seq_2_seq_lm.compile(sampler="greedy")
        answers = demo.generate_answers(seq_2_seq_lm, examples)
        if reference is None:
            reference = answers
        for kind, wanted in (("text", False), ("image", True)):
            rows = [i for i, example in enumerate(examples) if (example.image is not None) == wanted]
            same = np.mean([answers[i] == reference[i] for i in rows])
            results[f"{precision}_{kind}"] = {"agreement": float(same), "prompts": len(rows)}
        results[f"{precision}_exact_match"] = demo.exact_match(answers, examples)
    _common.print_results(results)


def _checkpoint(name, folder):
    config = _common.tiny_config() if name == "tiny" else _common.released_config(name)
    if not (Path(folder) / "config.json").exists():
        Path(folder).mkdir(parents=True, exist_ok=True)
        written, _ = _common.write_random_checkpoint(config, folder, earlier_layout_copy=False)
        return str(written)
    return str(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="270m-270m", help="a released size (270m-270m, 1b-1b, ...) or tiny")
    parser.add_argument("--checkpoint", help="the checkpoint folder (written there when it has no config.json)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.checkpoint or os.path.join(scratch, "checkpoint")
        if (Path(folder) / "current" / "config.json").exists():
            folder = str(Path(folder) / "current")
        checkpoint = _checkpoint(args.config, folder)
        print(f"load average before: {os.getloadavg()}", file=sys.stderr)
        runs = {precision: [] for precision in PRECISIONS}
        logits = {}
        for round_ in range(args.rounds):
            for precision in PRECISIONS:
                path = os.path.join(scratch, f"{precision}.npy")
                arguments = ["child", precision, checkpoint, args.new_tokens, path]
                result = _common.run_child(__file__, arguments, f"{precision} round {round_}")
                if result is not None:
                    runs[precision].append(result)
                    logits[precision] = np.load(path)
        agreement = None if args.skip_agreement else _common.run_child(__file__, ["agreement"], "agreement")
        print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    report(args, runs, logits, agreement)


def report(args, runs, logits, agreement):
    gib = 1 << 30
    print(
        f"\nconfig {args.config}, text only, {args.rounds} interleaved rounds, medians; load average {os.getloadavg()}"
    )
    print(
        "| precision | weights (GiB) | x int8 | peak while loading (GiB) | decode tok/s b1 | b8 | logit error | top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    reference = logits.get("float32")
    median = lambda precision, key: statistics.median(run[key] for run in runs[precision])  # noqa: E731
    for precision in PRECISIONS:
        if not runs[precision]:
            print(f"| {precision} | failed |")
            continue
        weights = median(precision, "weight_bytes")
        ratio = weights / median("int8", "weight_bytes") if runs["int8"] else float("nan")
        error, top1 = "", ""
        if reference is not None and precision in logits:
            error = f"{np.abs(logits[precision] - reference).max() / np.abs(reference).max():.4f}"
            top1 = f"{np.mean(logits[precision].argmax(-1) == reference.argmax(-1)):.3f}"
        print(
            f"| {precision} | {weights / gib:.3f} | {ratio:.2f} | {median(precision, 'peak_load_bytes') / gib:.2f} "
            f"| {median(precision, 'decode_tokens_per_s_b1'):.1f} | {median(precision, 'decode_tokens_per_s_b8'):.1f} "
            f"| {error} | {top1} |"
        )
    print(json.dumps({"runs": runs, "agreement": agreement}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "agreement":
        agreement_child()
    else:
        main()
