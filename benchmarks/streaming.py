"""Streamed against in-memory reading of a fine-tuning set: time and peak memory for one epoch, and a resume's seek.

A JSONL file of `--examples` input/target pairs (about 250 bytes each) is
written once; each measurement runs in a child process of its own, rounds
interleaved (memory, stream, memory, stream, ...), and the medians printed:

- memory: `data.read_pairs` and a seeded shuffle, as `fine_tune` reads a file
  without `--stream`;
- stream: an epoch of `ExampleStream` batches (the counting pass included),
  `--shuffle-buffer` records per window;
- resume: an `ExampleStream` positioned half way through the epoch (from its
  saved state) until its first batch.

Peak memory is the growth of the child's peak resident size over what it held
after its imports (VmHWM).

    python benchmarks/streaming.py --examples 400000 --rounds 3
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import peak_rss  # noqa: E402
from _common import print_results  # noqa: E402
from _common import reset_peak_rss  # noqa: E402
from _common import run_child  # noqa: E402


def write_data(path, count):
    with open(path, "w", encoding="utf-8") as file:
        for i in range(count):
            words = " ".join(str((i * 7 + k) % 1000) for k in range(50))
            file.write(json.dumps({"input": f"summarize: {words}", "target": words[:40]}) + "\n")


def child(mode, path, batch_size, shuffle_buffer):
    import numpy as np

    from keras_t5gemma.data import read_pairs
    from keras_t5gemma.training.input_pipeline import ExampleStream

    reset_peak_rss()
    base = peak_rss()
    start = time.perf_counter()
    if mode == "memory":
        pairs = read_pairs(path)
        order = np.random.default_rng(0).permutation(len(pairs))
        examples = sum(1 for i in order if pairs[i][0])
    else:
        stream = ExampleStream(path, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=0)
        position = None
        if mode == "resume":
            saved = stream.state(stream.position_after(stream.steps_per_epoch // 2))
            position = stream.position_of(saved)
        batches = stream.batches(*([position] if position else []))
        steps = 1 if mode == "resume" else stream.steps_per_epoch
        examples = sum(len(next(batches)["encoder_text"]) for _ in range(steps))
    seconds = time.perf_counter() - start
    print_results({"seconds": seconds, "examples": examples, "peak_mib": (peak_rss() - base) / 2**20})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batch_size, args.shuffle_buffer)
        return
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "pairs.jsonl")
    write_data(path, args.examples)
    size = os.path.getsize(path) / 2**20
    print(f"{args.examples:,} examples, {size:.0f} MiB; load average {os.getloadavg()}", flush=True)
    results = {"memory": [], "stream": [], "resume": []}
    for _ in range(args.rounds):
        for mode in results:
            extra = ["--batch-size", args.batch_size, "--shuffle-buffer", args.shuffle_buffer]
            result = run_child(Path(__file__), ["--child", mode, path, *extra], mode)
            if result:
                results[mode].append(result)
    print(f"{'':8} {'seconds':>8} {'examples/s':>11} {'peak MiB':>9}   (medians of {args.rounds} rounds)")
    for mode, rows in results.items():
        if rows:
            seconds = statistics.median(row["seconds"] for row in rows)
            rate = statistics.median(row["examples"] / row["seconds"] for row in rows)
            peak = statistics.median(row["peak_mib"] for row in rows)
            # A resume reads one batch: its time is the seek's, not a rate.
            rate = f"{rate:11,.0f}" if mode != "resume" else f"{'(1 batch)':>11}"
            print(f"{mode:8} {seconds:8.2f} {rate} {peak:9.1f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
