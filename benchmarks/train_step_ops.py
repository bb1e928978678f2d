"""Where one training step's time goes, per XLA op: keras_t5gemma against KerasHub.

    python benchmarks/train_step_ops.py --config 270m
    python benchmarks/train_step_ops.py --config tiny        # quick
    python benchmarks/train_step_ops.py --implementations keras_t5gemma --top 8   # the longest ops per class

Each implementation runs in its own process (as in `train_step.py`: batch 4,
256 encoder / 64 decoder tokens, float32, AdamW): one compiling step, one
timed step, then one step under `jax.profiler.trace`, with XLA's optimized
HLO of the step dumped as text. Each op's time in the trace (the CPU
runtime records one event per HLO op or fusion, on whichever of the
intra-op threads ran it) is put in a class by the op's source name in the
HLO (`op_name` metadata: forward or `transpose(...)` backward, encoder or
decoder, matmul or not, optimizer, LM head and loss). Op times on the two
threads overlap, so their sum exceeds the traced step's wall time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402
from _common import write_random_checkpoint  # noqa: E402
from benchmark_generate import CONFIGS  # noqa: E402
from train_step import ROOT  # noqa: E402
from train_step import _batch  # noqa: E402
from train_step import load_keras_t5gemma  # noqa: E402

IMPLEMENTATIONS = ("keras_t5gemma", "keras_hub")
HEAD_NAMES = ("table", "log_softmax", "compile_loss", "sparse_categorical", "token_embedding", "jvp()/")


def child(implementation, checkpoints, trace_directory):
    import jax

    if implementation == "keras_t5gemma":
        seq_2_seq_lm = load_keras_t5gemma(checkpoints / "current")
        backbone = seq_2_seq_lm.backbone
    else:
        from keras_hub.models import T5Gemma2Backbone
        from keras_hub.models import T5Gemma2Seq2SeqLM

        backbone = T5Gemma2Backbone.from_preset(str(checkpoints / "earlier"))
        seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone=backbone, preprocessor=None)
    encoder, decoder = _batch(backbone.vocabulary_size)
    x = _common.training_inputs(encoder, decoder)
    _common.compile_for_training(seq_2_seq_lm)
    seq_2_seq_lm.train_on_batch(x, decoder)
    started = time.perf_counter()
    seq_2_seq_lm.train_on_batch(x, decoder)
    step = time.perf_counter() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with jax.profiler.trace(trace_directory, create_perfetto_trace=True):
        seq_2_seq_lm.train_on_batch(x, decoder)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print("RESULT " + json.dumps({"step_s": step, "traced_step_minor_page_faults": faults}), flush=True)


def op_times(trace_directory):
    """HLO op name -> seconds, and the traced step's wall time, for the `jit_train_step` module."""
    trace = json.load(gzip.open(glob.glob(f"{trace_directory}/plugins/profile/*/perfetto_trace.json.gz")[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times, spans = collections.Counter(), []
    for event in events:
        arguments = event.get("args", {})
        if event.get("ph") == "X" and arguments.get("hlo_module") == "jit_train_step" and "hlo_op" in arguments:
            times[arguments["hlo_op"]] += event["dur"] / 1e6
            spans.append((event["ts"], event["ts"] + event["dur"]))
    return times, (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e6


def source_names(dump_directory):
    """HLO op name -> its `op_name` metadata, from the optimized HLO of the train step."""
    [path] = glob.glob(f"{dump_directory}/*jit_train_step.cpu_after_optimizations.txt")
    names = {}
    for line in open(path):
        match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .+? [\w\-]+\(", line)
        if match:
            source = re.search(r'op_name="([^"]*)"', line)
            names[match.group(1)] = source.group(1) if source else ""
    return names


def op_class(op, source):
    matmul = op.startswith(("ynn_fusion", "dot", "onednn", "xnn"))
    if "adam" in source.lower():
        return "AdamW update"
    if op.startswith("while") or "while/body" in source or any(name in source for name in HEAD_NAMES):
        return "LM head, loss, embeddings: " + ("matmuls" if matmul else "other")
    if not source:
        return "unnamed matmuls (fused attention)" if matmul else "weight copies at step start"
    if source.startswith("state["):
        return "weight copies at step start"
    side = "encoder" if "encoder" in source else "decoder"
    phase = "backward" if "transpose(" in source else "forward"
    return f"{side} layers {phase}: " + ("matmuls" if matmul else "other (softmax, norms, GeLU, copies)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="270m")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", help=argparse.SUPPRESS)
    parser.add_argument("--top", type=int, default=0, help="also list the N longest ops of each class")
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.checkpoints), args.trace)
        return

    results = {}
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(CONFIGS[args.config](), directory)
        for name in args.implementations:
            trace, dump = f"{directory}/{name}-trace", f"{directory}/{name}-hlo"
            environment = {
                **os.environ,
                "KERAS_BACKEND": "jax",
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "PYTHONPATH": str(ROOT),
                "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_train_step",
            }
            command = [sys.executable, __file__, "--child", name, "--checkpoints", directory, "--trace", trace]
            output = subprocess.run(command, env=environment, capture_output=True, text=True)
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"{name} failed:\n{output.stderr[-4000:]}")
            times, wall = op_times(trace)
            names = source_names(dump)
            classes, members = collections.Counter(), collections.defaultdict(list)
            for op, seconds in times.items():
                kind = op_class(op, names.get(op, ""))
                classes[kind] += seconds
                members[kind].append((seconds, op, names.get(op, "")))
            results[name] = {**json.loads(lines[0][len("RESULT ") :]), "classes": classes, "wall": wall}
            print(f"{name}: step {results[name]['step_s']:.2f} s, traced step {wall:.2f} s", flush=True)
            for kind in sorted(members, key=lambda kind: -classes[kind]) if args.top else ():
                print(f"  {kind}: {classes[kind]:.2f} s over {len(members[kind])} ops; the longest:")
                for seconds, op, source in sorted(members[kind], reverse=True)[: args.top]:
                    print(f"    {seconds:7.3f} s  {op}  {source[:150]}")
    names = list(results)
    print("\n| op class (seconds of op time) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    every = sorted({c for r in results.values() for c in r["classes"]}, key=lambda c: -results[names[0]]["classes"][c])
    for name in every:
        print(f"| {name} | " + " | ".join(f"{results[n]['classes'][name]:.2f}" for n in names) + " |")
    print("| sum of op times | " + " | ".join(f"{sum(results[n]['classes'].values()):.2f}" for n in names) + " |")
    print("| traced step, wall | " + " | ".join(f"{results[n]['wall']:.2f}" for n in names) + " |")
    print("| step before the trace | " + " | ".join(f"{results[n]['step_s']:.2f}" for n in names) + " |")
    faults = " | ".join(f"{results[n]['traced_step_minor_page_faults']:,}" for n in names)
    print(f"| minor page faults, traced step | {faults} |")


if __name__ == "__main__":
    main()
