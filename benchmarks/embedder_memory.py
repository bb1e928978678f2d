"""Memory and time saved by not building the decoder, for T5Gemma 2 embeddings.

    python benchmarks/embedder_memory.py                      # 270m-270m, random weights
    python benchmarks/embedder_memory.py --keras-preset DIR   # also loading a Keras preset

Every measurement runs in its own process, one after the other, so that its
memory is that model's alone: resident memory now (`/proc/self/statm`) and
at its peak (`ru_maxrss`), both above the process's baseline after imports.
The peak of a build is set by transient buffers of the random initialisation
of the embedding table, the same for both; the resident memory after it
shows what the model keeps.

- build: `backbone_from_hf_config(config, encoder_only=...)` with random
  weights, which is what `from_preset` builds before it reads weights:
  seconds, parameters, weight bytes, peak memory;
- one embedding batch (`--batch` texts of `--length` tokens) through
  `T5Gemma2Embedder`: the first call (compilation) and the fastest of five
  more; for the full model also the naive way to get the same vectors, a
  forward pass of the whole backbone with a one-token decoder input;
- with `--keras-preset DIR`: `T5Gemma2Backbone.from_preset(DIR)` of a full
  model's Keras preset (written there first if missing) against
  `from_preset(DIR, encoder_only=True)`, which is what
  `T5Gemma2Embedder.from_preset` does with a preset saved from a
  `T5Gemma2Seq2SeqLM`: the decoder is not built and its weights are not read.

Timings depend on the machine and its load; compare within one run.
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
DEFAULT_CONFIG = ROOT / "tests" / "data" / "t5gemma-2-270m-270m.json"
PARTS = ("encoder_only", "full")


def _peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _resident_bytes():
    """Resident memory now (Linux), which unlike the peak leaves out transient buffers."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _embedding_inputs(backbone, batch, length):
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = {
        "encoder_token_ids": rng.integers(3, 1000, (batch, length)).astype("int32"),
        "encoder_padding_mask": np.ones((batch, length), "int32"),
    }
    if backbone.vision_encoder is not None:
        size = backbone.vision_encoder.image_size
        inputs["images"] = np.zeros((batch, 0, size, size, 3), "float32")
    return inputs


def _time_calls(function, inputs, repeats=5):
    """`(first call seconds, fastest of the next calls)`; the fastest is the least disturbed."""
    start = time.perf_counter()
    function(inputs)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(inputs)
        times.append(time.perf_counter() - start)
    return first, min(times)


def measure_build(part, args):
    """Child: build one backbone and embed one batch."""
    import numpy as np

    from keras_t5gemma.conversion.config import backbone_from_hf_config
    from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder

    config = json.loads(Path(args.config).read_text())
    baseline, resident_baseline = _peak_bytes(), _resident_bytes()
    start = time.perf_counter()
    backbone = backbone_from_hf_config(
        config, text_only=args.text_only, encoder_only=part == "encoder_only", dtype=args.dtype
    )
    build_seconds = time.perf_counter() - start
    built_peak = _peak_bytes()
    result = {
        "parameters": backbone.count_params(),
        "weight_bytes": sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in backbone.weights),
        "build_s": build_seconds,
        "build_peak_bytes": built_peak - baseline,
        "build_resident_bytes": _resident_bytes() - resident_baseline,
    }
    inputs = _embedding_inputs(backbone, args.batch, args.length)
    embedder = T5Gemma2Embedder(backbone)
    result["embed_first_s"], result["embed_s"] = _time_calls(embedder.predict_on_batch, inputs)
    result["peak_bytes"] = _peak_bytes() - baseline
    result["resident_bytes"] = _resident_bytes() - resident_baseline
    if part == "full":
        inputs = {
            **inputs,
            "decoder_token_ids": np.full((args.batch, 1), 2, "int32"),
            "decoder_padding_mask": np.ones((args.batch, 1), "int32"),
        }
        result["naive_first_s"], result["naive_s"] = _time_calls(backbone.predict_on_batch, inputs)
    return result


def save_preset(directory, args):
    """Child: a full model's Keras preset with random weights."""
    from keras_t5gemma.conversion.config import backbone_from_hf_config

    config = json.loads(Path(args.config).read_text())
    backbone = backbone_from_hf_config(config, text_only=args.text_only, dtype=args.dtype)
    backbone.save_to_preset(directory)
    return {"bytes": sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())}


def measure_load(part, directory):
    """Child: load the backbone of a Keras preset, with or without its decoder."""
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

    baseline, resident_baseline = _peak_bytes(), _resident_bytes()
    start = time.perf_counter()
    backbone = T5Gemma2Backbone.from_preset(directory, encoder_only=part == "encoder_only")
    return {
        "load_s": time.perf_counter() - start,
        "parameters": backbone.count_params(),
        "peak_bytes": _peak_bytes() - baseline,
        "resident_bytes": _resident_bytes() - resident_baseline,
    }


def _run_child(task, args):
    command = [
        sys.executable,
        __file__,
        "--child",
        task,
        "--config",
        str(args.config),
        "--dtype",
        args.dtype,
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
    ]
    if args.text_only:
        command.append("--text-only")
    print(f"... {task}", file=sys.stderr, flush=True)
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _row(name, encoder_only, full, unit=1.0, digits=1):
    saved = full - encoder_only
    share = f" ({saved / full:.0%})" if full else ""
    return (
        f"{name:<48}{encoder_only / unit:>14,.{digits}f}{full / unit:>14,.{digits}f}"
        f"{saved / unit:>12,.{digits}f}{share:>6}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a T5Gemma 2 config.json")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8, help="texts per embedding batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per text")
    parser.add_argument("--text-only", action="store_true", help="build no vision tower")
    parser.add_argument("--keras-preset", help="folder of a full model's Keras preset (written if missing)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        kind, _, rest = args.child.partition(":")
        if kind == "build":
            result = measure_build(rest, args)
        elif kind == "save":
            result = save_preset(rest, args)
        else:
            part, _, directory = rest.partition(":")
            result = measure_load(part, directory)
        print(json.dumps(result))
        return

    builds = {part: _run_child(f"build:{part}", args) for part in PARTS}
    loads = None
    if args.keras_preset:
        if not (Path(args.keras_preset) / "config.json").exists():
            _run_child(f"save:{args.keras_preset}", args)
        loads = {part: _run_child(f"load:{part}:{args.keras_preset}", args) for part in PARTS}

    mib = 2**20
    encoder_only, full = builds["encoder_only"], builds["full"]
    print(
        f"\n{Path(args.config).name}, {args.dtype}, {'text only' if args.text_only else 'with vision tower'}, "
        f"random weights; embedding batch {args.batch} x {args.length} tokens"
    )
    print(f"{'':<48}{'encoder-only':>14}{'full':>14}{'saved':>18}")
    print(_row("parameters", encoder_only["parameters"], full["parameters"], digits=0))
    print(_row("weights (MiB)", encoder_only["weight_bytes"], full["weight_bytes"], mib))
    print(_row("build time (s)", encoder_only["build_s"], full["build_s"], digits=2))
    print(_row("resident after build (MiB)", encoder_only["build_resident_bytes"], full["build_resident_bytes"], mib))
    print(_row("resident after an embedding batch (MiB)", encoder_only["resident_bytes"], full["resident_bytes"], mib))
    print(_row("peak resident, build + embedding batch (MiB)", encoder_only["peak_bytes"], full["peak_bytes"], mib))
    print(_row("embedding batch, first call (s)", encoder_only["embed_first_s"], full["embed_first_s"], digits=2))
    print(_row("embedding batch (s)", encoder_only["embed_s"], full["embed_s"], digits=3))
    # The same vectors the naive way: a whole-backbone forward with one decoder token.
    print(_row("embedding batch vs naive whole-model forward (s)", encoder_only["embed_s"], full["naive_s"], digits=3))
    if loads:
        print(f"\nKeras preset of the full model ({args.keras_preset})")
        print(_row("from_preset time (s)", loads["encoder_only"]["load_s"], loads["full"]["load_s"], digits=2))
        print(_row("parameters loaded", loads["encoder_only"]["parameters"], loads["full"]["parameters"], digits=0))
        print(
            _row(
                "resident after from_preset (MiB)",
                loads["encoder_only"]["resident_bytes"],
                loads["full"]["resident_bytes"],
                mib,
            )
        )
        print(
            _row(
                "peak resident during from_preset (MiB)",
                loads["encoder_only"]["peak_bytes"],
                loads["full"]["peak_bytes"],
                mib,
            )
        )


if __name__ == "__main__":
    main()
