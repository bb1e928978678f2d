"""Packed against padded training on long-tailed lengths: non-padding tokens per second, padding, peak memory.

Examples have log-normal lengths (median 40 tokens, sigma 1), capped at 512
encoder / 128 decoder tokens, random token ids. Padded: one example per row of
512 / 128 tokens (what `fine-tune --encoder-length 512 --decoder-length 128`
trains on). Packed: the same examples packed into rows of the same lengths
(`training.packing.pack_examples`, greedy first fit). Both train with the
token-mean loss, `--batch` rows per step, through `train_on_batch` after one
untimed step (compilation). Each measurement runs in a child process of its
own (its peak memory is its own), padded and packed alternating each round.

    python benchmarks/packing.py --model demo --examples 256 --rounds 3
    python benchmarks/packing.py --model 270m --examples 16 --batch 2 --rounds 2

Prints a table: rows, padding fraction, seconds per epoch (median of the
rounds), non-padding tokens per second and peak resident memory growth.

`--exact-match` measures the issue's "same loss curve" instead: the demo's
fine-tuning (`keras-t5gemma demo`: teach the demo preset `rotate`, the known
`reverse` and `sort` replayed; no `color`, whose images are not packed) run
through `fine_tune` padded and packed on the same examples, then greedy
held-out exact match on new `rotate` prompts and on the known operations.
Packed runs take `--batch` rows and half as many (about the examples of a
padded step, two demo pairs fitting a row of 32 / 16 tokens):

    python benchmarks/packing.py --exact-match --examples 16000 --batch 32 --seeds 0 1
"""

import argparse
import statistics
import sys
import time

import _common

ENCODER_CAP, DECODER_CAP, MEDIAN, SIGMA = 512, 128, 40, 1.0


def lengths(count, cap, seed):
    import numpy as np

    drawn = np.random.default_rng(seed).lognormal(np.log(MEDIAN), SIGMA, count)
    return np.clip(np.round(drawn), 2, cap).astype(int)


def examples(count, low, high):
    """Right-padded `(x, y, sample_weight)`, one example per row of the caps, token ids in `[low, high)`."""
    import numpy as np

    rng = np.random.default_rng(0)
    encoder_lengths, decoder_lengths = lengths(count, ENCODER_CAP, 1), lengths(count, DECODER_CAP, 2)
    x = {
        "encoder_token_ids": np.zeros((count, ENCODER_CAP), "int32"),
        "encoder_padding_mask": np.zeros((count, ENCODER_CAP), "int32"),
        "decoder_token_ids": np.zeros((count, DECODER_CAP), "int32"),
        "decoder_padding_mask": np.zeros((count, DECODER_CAP), "int32"),
    }
    y = np.zeros((count, DECODER_CAP), "int32")
    weights = np.zeros((count, DECODER_CAP), "float32")
    for i, (encoder, decoder) in enumerate(zip(encoder_lengths, decoder_lengths)):
        x["encoder_token_ids"][i, :encoder] = rng.integers(low, high, encoder)
        x["encoder_padding_mask"][i, :encoder] = 1
        x["decoder_token_ids"][i, :decoder] = rng.integers(low, high, decoder)
        x["decoder_padding_mask"][i, :decoder] = 1
        y[i, :decoder] = rng.integers(low, high, decoder)
        weights[i, :decoder] = 1.0
    return x, y, weights


def build(model):
    import keras

    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    if model == "demo":
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    else:
        from keras_t5gemma.conversion.config import backbone_kwargs_from_hf_config
        from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

        config = _common.float32_config(_common.released_config("270m-270m"))
        config["encoder"].pop("vision_config", None)
        kwargs = backbone_kwargs_from_hf_config(config)
        kwargs.pop("vision_config", None)
        kwargs.pop("mm_tokens_per_image", None)
        keras.utils.set_random_seed(0)
        seq_2_seq_lm = T5Gemma2Seq2SeqLM(T5Gemma2Backbone(**kwargs, dtype="float32"))
    return seq_2_seq_lm


def child(model, mode, count, batch):
    import keras
    import numpy as np

    from keras_t5gemma.training.packing import pack_examples
    from keras_t5gemma.training.packing import padding_fraction
    from keras_t5gemma.training.packing import token_mean_loss

    seq_2_seq_lm = build(model)
    seq_2_seq_lm.compile(optimizer=keras.optimizers.AdamW(1e-5), loss=token_mean_loss())
    backbone = seq_2_seq_lm.backbone
    # Ordinary pieces only: the image placeholder (and end-of-image) ids of
    # the demo's small vocabulary would call for images.
    special = [i for i in (backbone.image_token_index, backbone.eoi_token_index) if i < backbone.vocabulary_size]
    x, y, weights = examples(count, max([3, *special]) + 1, min(backbone.vocabulary_size, 255_000))
    if mode == "packed":
        x, y, weights = pack_examples(x, y, weights)
    rows = len(y)
    padding = padding_fraction(np.concatenate([x["encoder_padding_mask"], x["decoder_padding_mask"]], axis=1))
    steps = [slice(start, start + batch) for start in range(0, rows - batch + 1, batch)]
    tokens = sum(int(x["encoder_padding_mask"][step].sum() + x["decoder_padding_mask"][step].sum()) for step in steps)

    def part(step):
        return {key: value[step] for key, value in x.items()}, y[step], weights[step]

    baseline = _common.current_rss()
    _common.reset_peak_rss()
    seq_2_seq_lm.train_on_batch(*part(steps[0]))  # compiles
    started = time.perf_counter()
    for step in steps:
        loss = seq_2_seq_lm.train_on_batch(*part(step))
    seconds = time.perf_counter() - started
    _common.print_results(
        {
            "rows": rows,
            "steps": len(steps),
            "padding": padding,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds,
            "peak_bytes": _common.peak_rss() - baseline,
            "loss": float(np.ravel(np.asarray(loss))[0]),
        }
    )


def exact_match_child(mode, count, batch, seed):
    """Fine-tunes the demo preset on the demo's pairs (`mode`: padded, or packed into `batch` rows a step), then
    scores greedy answers to held-out prompts."""
    import tempfile

    import keras

    from keras_t5gemma.demo import exact_match
    from keras_t5gemma.demo import generate_answers
    from keras_t5gemma.demo import make_examples
    from keras_t5gemma.training.fine_tune import fine_tune
    from keras_t5gemma.training.packing import token_mean_loss

    train = make_examples(["rotate", "rotate", "reverse", "sort"], count, seed=seed + 12)
    new = make_examples(["rotate"], 200, seed=seed + 10, held_out=True)
    known = make_examples(["reverse", "sort"], 200, seed=seed + 11, held_out=True)
    lines = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output:
        result = fine_tune(
            [(example.prompt, example.target) for example in train],
            output,
            pack=mode != "padded",
            epochs=1,
            batch_size=batch,
            learning_rate=2e-3,
            encoder_length=32,
            decoder_length=16,
            seed=seed,
            verbose=0,
            log=lines.append,
        )
    seconds = time.perf_counter() - started
    seq_2_seq_lm = result.model
    packed = [line for line in lines if line.startswith("Packed")]
    # One held-out loss for both (the padded run's `fit` loss also counts padding positions): over target tokens.
    held_out = new + known
    x, y, weights = keras.utils.unpack_x_y_sample_weight(
        seq_2_seq_lm.preprocessor(
            {"encoder_text": [e.prompt for e in held_out], "decoder_text": [e.target for e in held_out]}
        )
    )
    held_out_loss = float(token_mean_loss()(y, seq_2_seq_lm(x), weights))
    _common.print_results(
        {
            "seconds": seconds,
            "loss": held_out_loss,
            "rows": int(packed[0].split(" into ")[1].split()[0].replace(",", "")) if packed else count,
            "rotate": exact_match(generate_answers(seq_2_seq_lm, new), new),
            "known": exact_match(generate_answers(seq_2_seq_lm, known), known),
        }
    )


def exact_match_main(args):
    runs = {"padded": [], f"packed {args.batch // 2} rows": [], f"packed {args.batch} rows": []}
    batches = {"padded": args.batch, f"packed {args.batch // 2} rows": args.batch // 2}
    batches[f"packed {args.batch} rows"] = args.batch
    for seed in args.seeds:
        modes = list(runs) if seed % 2 == 0 else list(runs)[::-1]
        for mode in modes:
            arguments = ["--exact-match-child", mode.split()[0], batches[mode], seed, "--examples", args.examples]
            result = _common.run_child(__file__, arguments, f"{mode} seed {seed}", timeout=args.timeout)
            if result:
                runs[mode].append(result)
    print(f"demo fine-tuning: {args.examples} examples, 1 epoch, seeds {args.seeds} (means over seeds)")
    print("| training | rows | steps | held-out loss | held-out rotate | held-out reverse/sort | seconds |")
    print("|---|---|---|---|---|---|---|")
    for mode, results in runs.items():
        if not results:
            print(f"| {mode} | failed | | | | | |")
            continue
        rows = results[0]["rows"]
        steps = -(-rows // batches[mode])

        def mean(key, results=results):
            return statistics.mean(result[key] for result in results)

        print(
            f"| {mode} | {rows} | {steps} | {mean('loss'):.4f} | {mean('rotate'):.1%} | {mean('known'):.1%} | "
            f"{mean('seconds'):.0f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exact-match", action="store_true", help="the demo's held-out exact match, packed or not")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --exact-match")
    parser.add_argument("--exact-match-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=("demo", "270m"), default="demo")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exact_match_child:
        mode, batch, seed = args.exact_match_child
        return exact_match_child(mode, args.examples, int(batch), int(seed))
    if args.exact_match:
        return exact_match_main(args)
    if args.child:
        return child(*args.child, args.examples, args.batch)
    results = {"padded": [], "packed": []}
    for round_ in range(args.rounds):
        modes = ("padded", "packed") if round_ % 2 == 0 else ("packed", "padded")
        for mode in modes:
            arguments = ["--child", args.model, mode, "--examples", args.examples, "--batch", args.batch]
            result = _common.run_child(__file__, arguments, f"{mode} round {round_}", timeout=args.timeout)
            if result:
                results[mode].append(result)
    print(f"{args.model}: {args.examples} examples, {args.batch} rows per step, {args.rounds} rounds (medians)")
    print("| mode | rows | padding | s per epoch | non-padding tokens/s | peak RSS growth |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for mode, runs in results.items():
        if not runs:
            print(f"| {mode} | failed | | | | |")
            continue
        medians[mode] = statistics.median(run["tokens_per_second"] for run in runs)
        print(
            f"| {mode} | {runs[0]['rows']} | {runs[0]['padding']:.1%} | "
            f"{statistics.median(run['seconds'] for run in runs):.2f} | {medians[mode]:,.0f} | "
            f"{max(run['peak_bytes'] for run in runs) / 2**20:,.0f} MiB |"
        )
    if len(medians) == 2:
        print(f"packed / padded non-padding tokens/s: {medians['packed'] / medians['padded']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
