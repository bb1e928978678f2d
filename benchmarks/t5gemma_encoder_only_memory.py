"""Memory of the T5Gemma (first generation) encoder-only backbone against the full one, random weights.

    python benchmarks/t5gemma_encoder_only_memory.py                       # 2b-2b, both forms, bfloat16
    python benchmarks/t5gemma_encoder_only_memory.py --parts encoder_only  # one form only

The encoder-only form (`encoder_only=True`, what `T5GemmaEmbedder` and the
encoder-only classifiers build, and what an `is_encoder_decoder: false`
checkpoint loads as) builds no decoder, no decoder embedding table and no
cross-attention. Each form is built in its own process as `from_preset`
builds it (`built_without_values`: no initializer runs), then each variable
is filled once with random values (`utils.loading.fill`, as a load fills it
from a checkpoint), then one text is encoded: parameters, weight bytes, the
resident memory above the process's baseline (`/proc/self/statm`) after the
build, after the fill and at its peak (`ru_maxrss`, which counts the
transient buffer of the largest random tensor and of the encode).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
DEFAULT_CONFIG = ROOT / "tests" / "data" / "t5gemma-2b-2b.json"
PARTS = ("encoder_only", "full")
GIB = 2**30


def _peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _resident_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(part, args):
    """Child: build one form, encode one batch, report its memory."""
    import numpy as np

    from keras_t5gemma.conversion.t5gemma_config import backbone_from_t5gemma_config
    from keras_t5gemma.utils.loading import built_without_values
    from keras_t5gemma.utils.loading import fill
    from keras_t5gemma.utils.loading import model_bytes

    config = json.loads(Path(args.config).read_text())
    baseline, resident_baseline = _peak_bytes(), _resident_bytes()
    start = time.perf_counter()
    backbone = built_without_values(
        lambda: backbone_from_t5gemma_config(config, encoder_only=part == "encoder_only", dtype=args.dtype)
    )
    result = {
        "build_s": time.perf_counter() - start,
        "parameters": sum(int(np.prod(w.shape)) for w in backbone.weights),
        "weight_bytes": model_bytes(backbone),
        "build_resident_bytes": _resident_bytes() - resident_baseline,
    }
    if not args.fill:
        return result
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for variable in backbone.weights:
        fill(variable, lambda: rng.standard_normal(tuple(variable.shape), np.float32) * 0.02)
    result["fill_s"] = time.perf_counter() - start
    result["resident_bytes"] = _resident_bytes() - resident_baseline
    token_ids = rng.integers(3, 1000, (1, args.length)).astype("int32")
    start = time.perf_counter()
    backbone.encode(token_ids, np.ones_like(token_ids))
    result["encode_s"] = time.perf_counter() - start
    result["peak_bytes"] = _peak_bytes() - baseline
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a T5Gemma config.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=256, help="tokens of the encoded text")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--fill", action="store_true", help="fill with random values and encode (needs the RAM)")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        print(json.dumps(measure(args.child, args)))
        return
    print(f"{Path(args.config).name}, {args.dtype}, one text of {args.length} tokens; load: {os.getloadavg()}")
    columns = ("parameters", "weights GiB", "built GiB", "filled GiB", "peak GiB", "encode s")
    print(f"{'form':<14}" + "".join(f"{name:>14}" for name in columns))
    for part in args.parts:
        command = [sys.executable, __file__, "--child", part, "--config", str(args.config), "--dtype", args.dtype]
        command += ["--length", str(args.length)] + (["--fill"] if args.fill else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        filled = [row.get(name) for name in ("resident_bytes", "peak_bytes")]
        cells = [
            f"{row['parameters']:,}",
            f"{row['weight_bytes'] / GIB:.2f}",
            f"{row['build_resident_bytes'] / GIB:.2f}",
        ]
        cells += ["-" if value is None else f"{value / GIB:.2f}" for value in filled]
        cells.append("-" if "encode_s" not in row else f"{row['encode_s']:.1f}")
        print(f"{part:<14}" + "".join(f"{cell:>14}" for cell in cells))


if __name__ == "__main__":
    main()
