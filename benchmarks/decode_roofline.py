"""Greedy decoding at the memory roofline: float32, bfloat16 and int8, here and in the peers.

    flock /tmp/bench.lock python benchmarks/decode_roofline.py
    python benchmarks/decode_roofline.py --rounds 1 --new-tokens 8 --implementations ours:float32 ours:int8
    python benchmarks/decode_roofline.py --kernels   # XLA CPU's output projection by dtype, 1 and 2 rows
    python benchmarks/decode_roofline.py --profile float32 int8 bfloat16   # where a decode step's time goes

At the 270m-270m shape (random weights, text only, 64-token prompts) it times
greedy `generate` at batch 1 and 8 for each implementation and dtype:

- ours (`keras_t5gemma`, JAX): float32, bfloat16 (`dtype="bfloat16"` on
  load), int8 (`quantize="int8"` on load, straight into int8);
- KerasHub 0.32 (`keras_hub.models.T5Gemma2Seq2SeqLM`, from a copy of the
  checkpoint in the layout it reads): float32, bfloat16, its own
  `quantize("int8")`;
- `transformers`: float32, bfloat16, and PyTorch's dynamic int8 quantization
  of the `nn.Linear` layers (`torch.ao.quantization.quantize_dynamic`);
- CTranslate2 (`pip install ctranslate2==4.8.5`, not a dependency of the
  package): float32 and int8, the same checkpoint through its own
  `TransformersConverter` (run once, before the rounds; the random checkpoint
  has no tokenizer, so the converter is given a stand-in vocabulary of
  numbered pieces, which is all it reads of one), `Translator.translate_batch`
  on token pieces with `min_decoding_length` so that every call decodes the
  same number of tokens, on all CPU threads.

Each (implementation, dtype) runs in its own process, one after another in
each round (A, B, C, ..., A, B, C, ...); the table gives medians over rounds
of tokens/s (each child's best of `--repeats` calls after a warm-up call),
the ratio of ours to each peer at the same dtype, the resident weight bytes,
the peak resident memory while loading and generating (above the process's
size after importing its frameworks), the whole process's peak while
generating (imports and runtime included), and the fraction of the roofline at
batch 1: the weight bytes a step reads (decoder layers and the tied table,
at the dtype's width) over the read bandwidth measured here.
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402

IMPLEMENTATIONS = [
    f"{name}:{dtype}"
    for dtype in ("float32", "bfloat16", "int8")
    for name in ("ours", "keras_hub", "transformers", "ctranslate2")
    if (name, dtype) != ("ctranslate2", "bfloat16")  # CTranslate2 has no bfloat16 kernels on CPU
]
PROMPT_TOKENS = 64
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "int8": 1}


# === Children ===


def _time_generate(generate, batches, repeats):
    results = {}
    for batch in batches:
        generate(batch)  # compilation, caches
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            generated = generate(batch)
            times.append(time.perf_counter() - started)
        results[f"tokens_per_s_b{batch}"] = generated / min(times)
    return results


def _keras_generate(seq_2_seq_lm, vocabulary, new_tokens):
    import numpy as np

    seq_2_seq_lm.compile(sampler="greedy")

    def generate(batch):
        encoder = _common.prompts(batch, PROMPT_TOKENS, vocabulary)
        decoder = np.zeros((batch, new_tokens + 1), "int32")
        decoder[:, 0] = 2
        inputs = {
            "encoder_token_ids": encoder,
            "encoder_padding_mask": np.ones_like(encoder),
            "decoder_token_ids": decoder,
            "decoder_padding_mask": (decoder > 0).astype("int32"),
        }
        seq_2_seq_lm.generate(inputs, stop_token_ids=None)
        return batch * new_tokens

    return generate


def _keras_weight_bytes(model):
    return sum(int(v.value.nbytes) for v in model.weights)


def run_ours(checkpoint, dtype):
    from keras_t5gemma import T5Gemma2Backbone
    from keras_t5gemma import T5Gemma2Seq2SeqLM

    # int8 loads straight into int8 (`quantize=` on load), never holding the float32 model.
    backbone = T5Gemma2Backbone.from_preset(
        str(checkpoint),
        text_only=True,
        dtype="bfloat16" if dtype == "bfloat16" else None,
        quantize="int8" if dtype == "int8" else None,
    )
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    return _keras_weight_bytes(backbone), _keras_generate, (seq_2_seq_lm, backbone.vocabulary_size)


def run_keras_hub(checkpoint, dtype):
    from keras_hub.models import T5Gemma2Backbone
    from keras_hub.models import T5Gemma2Seq2SeqLM

    backbone = T5Gemma2Backbone.from_preset(str(checkpoint), dtype="bfloat16" if dtype == "bfloat16" else None)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone=backbone, preprocessor=None)
    if dtype == "int8":
        seq_2_seq_lm.quantize("int8")
    vocabulary = backbone.vocabulary_size
    return _keras_weight_bytes(backbone), _keras_generate, (seq_2_seq_lm, vocabulary)


def run_transformers(checkpoint, dtype):
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = T5Gemma2ForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch_dtype).eval()
    if dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    for module in model.modules():  # dynamic-quantized linears keep packed weights outside the tensors above
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight = module.weight()
            weight_bytes += weight.numel() * weight.element_size()
    vocabulary = model.config.decoder.vocab_size

    def make_generate(model, vocabulary, new_tokens):
        def generate(batch):
            ids = torch.tensor(_common.prompts(batch, PROMPT_TOKENS, vocabulary)).long()
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                )
            return batch * new_tokens

        return generate

    return weight_bytes, make_generate, (model, vocabulary)


class _StandInVocabulary:
    """What CTranslate2's converter reads of a tokenizer: pieces by id and the special tokens."""

    bos_token, eos_token, unk_token = "<bos>", "<eos>", "<unk>"

    def __init__(self, size):
        self.size = size

    def get_vocab(self):
        special = {0: "<pad>", 1: self.eos_token, 2: self.bos_token, 3: self.unk_token}
        return {special.get(i, f"piece{i}"): i for i in range(self.size)}


def convert_for_ctranslate2(checkpoint, output, dtype):
    """CTranslate2's own conversion of `checkpoint` into `output` (`int8` weights or `float32`)."""
    import json

    from ctranslate2.converters import TransformersConverter

    size = json.loads((Path(checkpoint) / "config.json").read_text())["decoder"]["vocab_size"]

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _StandInVocabulary(size)

    Converter(str(checkpoint)).convert(str(output), quantization=dtype, force=True)
    return output


def run_ctranslate2(checkpoint, dtype):
    import json

    import ctranslate2

    folder = Path(checkpoint).parent / f"ctranslate2_{dtype}"
    translator = ctranslate2.Translator(str(folder), device="cpu", compute_type=dtype, intra_threads=os.cpu_count())
    weight_bytes = (folder / "model.bin").stat().st_size

    def make_generate(translator, vocabulary, new_tokens):
        def generate(batch):
            prompts = _common.prompts(batch, PROMPT_TOKENS, vocabulary)
            pieces = [[f"piece{int(i)}" if i > 3 else "<unk>" for i in row] for row in prompts]
            translator.translate_batch(
                pieces,
                beam_size=1,
                max_decoding_length=new_tokens,
                min_decoding_length=new_tokens,
                max_batch_size=batch,
            )
            return batch * new_tokens

        return generate

    vocabulary = json.loads((Path(checkpoint) / "config.json").read_text())["decoder"]["vocab_size"]
    return weight_bytes, make_generate, (translator, vocabulary)


def child(implementation, checkpoint, new_tokens, repeats):
    name, dtype = implementation.split(":")
    if name == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    elif name == "ctranslate2":
        import ctranslate2  # noqa: F401
    else:
        import jax
        import keras_hub  # noqa: F401

        import keras_t5gemma  # noqa: F401

        jax.numpy.zeros(1).block_until_ready()
    baseline = _common.current_rss()
    runners = {"ours": run_ours, "keras_hub": run_keras_hub, "transformers": run_transformers}
    runner = {**runners, "ctranslate2": run_ctranslate2}[name]
    weight_bytes, make_generate, arguments = runner(checkpoint, dtype)
    results = {"weight_bytes": weight_bytes, "load_peak_bytes": _common.peak_rss() - baseline}
    _common.reset_peak_rss()
    results.update(_time_generate(make_generate(*arguments, new_tokens), (1, 8), repeats))
    results["generate_peak_bytes"] = _common.peak_rss() - baseline
    # The whole process, imports and runtime included (the "process peak while decoding").
    results["process_peak_bytes"] = _common.peak_rss()
    _common.print_results(results)


def kernels(repeats=5):
    """XLA CPU's output-projection product `(rows, 640) x (262144, 640)^T` by dtype, with one and two rows (ms)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    table = rng.normal(size=(262_144, 640)).astype("float32")
    variants = {
        "float32": (table, "float32", None),
        "bfloat16, bfloat16 sums": (table.astype(jnp.bfloat16), "bfloat16", None),
        "bfloat16, float32 sums": (table.astype(jnp.bfloat16), "bfloat16", "float32"),
        "int8 x int8, int32 sums": (rng.integers(-127, 128, table.shape).astype("int8"), "int8", "int32"),
    }
    print("| product (one row = batch-1 decode) | 1 row | 2 rows |\n|---|---|---|")
    for label, (weights, dtype, accumulate) in variants.items():
        weights = jnp.asarray(weights)
        cells = []
        for rows in (1, 2):
            x = jnp.asarray(rng.normal(size=(rows, 640)).astype("float32") * 10).astype(dtype)
            product = jax.jit(lambda x, w: jnp.einsum("bd,vd->bv", x, w, preferred_element_type=accumulate))
            product(x, weights).block_until_ready()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                product(x, weights).block_until_ready()
                times.append(time.perf_counter() - started)
            cells.append(f"{1000 * statistics.median(times):.1f}")
        print(f"| {label} | {cells[0]} | {cells[1]} |", flush=True)


# Where a compiled op's time goes, by the `op_name` XLA keeps in its metadata (first match wins).
PROFILE_PARTS = (
    ("output projection (tied table)", r"/table/"),
    ("attention projections", r"/attention/(query|key|value|attention_output)/"),
    ("MLP projections", r"/feedforward/(gate|up|down)/"),
    ("projections whose names XLA dropped", r"/unnamed projection/"),
    ("attention (scores, softmax, cache)", r"/attention/"),
    ("norms", r"norm"),
    ("other (sampler, loop, casts)", r""),
)


def _hlo_op_names(hlo):
    """`({instruction: op_name}, {instruction: in the decode loop})` from an optimised HLO module's text.

    The decode loop is the largest `while` body and what it calls (fused
    computations are not executed as their own ops, so do not count).
    """
    computations, op_names, current = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        instruction = re.match(r"^\s*(?:ROOT )?%([\w.-]+) = ", line)
        if instruction and current is not None:
            current.append(line)
            metadata = re.search(r'op_name="([^"]+)"', line)
            if metadata:
                op_names[instruction.group(1)] = metadata.group(1)
    bodies = [
        body for lines in computations.values() for line in lines for body in re.findall(r"body=%([\w.-]+)", line)
    ]
    loop, pending = set(), [max(bodies, key=lambda body: len(computations.get(body, [])))] if bodies else []
    while pending:
        computation = pending.pop()
        if computation in loop:
            continue
        loop.add(computation)
        for line in computations.get(computation, []):
            for key in ("to_apply", "body", "condition", "branch_computations", "called_computations"):
                for called in re.findall(key + r"=\{?%([\w.-]+)", line):
                    pending.append(called)
            if " calls=%" in line and " fusion(" not in line:
                pending.extend(re.findall(r"calls=%([\w.-]+)", line))
    in_loop = {}
    for computation, lines in computations.items():
        for line in lines:
            name = re.match(r"^\s*(?:ROOT )?%([\w.-]+) = ", line).group(1)
            in_loop[name] = computation in loop
    return op_names, in_loop


def profile_child(dtype, new_tokens, batch, dump_folder):
    """Times one traced `generate` of ours at 270m (random weights) and splits the decode steps' op time by part."""
    import collections
    import glob
    import gzip
    import json
    import re

    import jax

    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma.conversion.config import backbone_from_hf_config

    config = _common.released_config("270m-270m")
    backbone = backbone_from_hf_config(config, text_only=True, dtype="bfloat16" if dtype == "bfloat16" else None)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone)
    if dtype == "int8":
        seq_2_seq_lm.quantize("int8")
    generate = _keras_generate(seq_2_seq_lm, backbone.vocabulary_size, new_tokens)
    generate(batch)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        generate(batch)
        times.append(time.perf_counter() - started)
    trace_folder = Path(dump_folder) / "trace"
    jax.profiler.start_trace(str(trace_folder), create_perfetto_trace=True)
    generate(batch)
    jax.profiler.stop_trace()

    modules = glob.glob(f"{dump_folder}/*compiled_generate_function*after_optimizations.txt")
    op_names, in_loop = _hlo_op_names(Path(max(modules, key=os.path.getsize)).read_text())
    (trace_file,) = glob.glob(f"{trace_folder}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    parts = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in in_loop:
            continue
        if not in_loop[name]:
            parts["prompt (encoder, first step)"] += event["dur"]
            continue
        # XLA drops the metadata of some rewritten dots (float32's one-row products): projections.
        op_name = op_names.get(name) or ("/unnamed projection/" if name.startswith("dot") else "")
        part = next(label for label, pattern in PROFILE_PARTS if re.search(pattern, op_name))
        parts[part] += event["dur"]
    steps = new_tokens - 1
    _common.print_results(
        {
            "tokens_per_s": batch * new_tokens / min(times),
            "ms_per_step": {part: microseconds / 1000 / steps for part, microseconds in parts.items()},
        }
    )


def profile(dtypes, new_tokens, batch=1):
    """`profile_child` for each dtype, one process each, as a table of ms per decode step."""
    print(
        f"Profile of ours at 270m-270m, batch {batch}, {new_tokens} new tokens; load average {os.getloadavg()[0]:.1f}"
    )
    results = {}
    for dtype in dtypes:
        with tempfile.TemporaryDirectory() as folder:
            environment = {"XLA_FLAGS": f"--xla_dump_to={folder} --xla_dump_hlo_as_text"}
            arguments = ["--profile-child", dtype, "--dump", folder, "--new-tokens", new_tokens, "--batch", batch]
            results[dtype] = _common.run_child(__file__, arguments, f"profile {dtype}", environment=environment)
    parts = [label for label, _ in PROFILE_PARTS] + ["prompt (encoder, first step)"]
    print("| ms per decode step | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for part in parts:
        cells = [f"{(result or {}).get('ms_per_step', {}).get(part, 0.0):.1f}" for result in results.values()]
        print(f"| {part} | " + " | ".join(cells) + " |")
    totals = [
        sum(v for k, v in (r or {}).get("ms_per_step", {}).items() if not k.startswith("prompt"))
        for r in results.values()
    ]
    print("| decode step, all ops | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    print(
        "| tokens/s (best of 3, untraced) | "
        + " | ".join(f"{(r or {}).get('tokens_per_s', 0):.2f}" for r in results.values())
        + " |"
    )
    print(f"Load average {os.getloadavg()[0]:.1f} at the end. (The prompt row is per call, divided by the steps too.)")


# === Parent ===


def decode_bytes_per_step(config, dtype):
    """Weight bytes a batch-1 decode step reads: decoder layers, final norm and the tied table."""
    decoder = config["decoder"]
    hidden, heads, kv_heads = decoder["hidden_size"], decoder["num_attention_heads"], decoder["num_key_value_heads"]
    head_dim, intermediate = decoder.get("head_dim", 256), decoder["intermediate_size"]
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate
    norms = 2 * head_dim + 4 * hidden
    table = decoder["vocab_size"] * hidden
    width = BYTES_PER_WEIGHT[dtype]
    if dtype == "int8":  # int8 projections and table with float32 per-channel scales; float32 norms
        scales = heads * head_dim + 2 * kv_heads * head_dim + hidden + 2 * intermediate + hidden
        table_bytes = table + 4 * decoder["vocab_size"]
        return decoder["num_hidden_layers"] * (projections + 4 * (norms + scales)) + 4 * hidden + table_bytes
    return width * (decoder["num_hidden_layers"] * (projections + norms) + hidden + table)


def report(config, results, bandwidth, new_tokens):
    def median(implementation, key):
        values = [r[key] for r in results.get(implementation, []) if r]
        return statistics.median(values) if values else None

    gib = 2**30
    lines = [
        "| implementation | tok/s b1 | tok/s b8 | ours / this (b1) | ours / this (b8) | weights (GiB) | "
        "peak load (GiB) | peak generate (GiB) | process peak (GiB) | roofline b1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for implementation in results:
        name, dtype = implementation.split(":")
        b1, b8 = median(implementation, "tokens_per_s_b1"), median(implementation, "tokens_per_s_b8")
        if b1 is None:
            lines.append(f"| {implementation} | failed | | | | | | | | |")
            continue
        ours1, ours8 = median(f"ours:{dtype}", "tokens_per_s_b1"), median(f"ours:{dtype}", "tokens_per_s_b8")
        ratio1 = f"{ours1 / b1:.2f}x" if ours1 and name != "ours" else "-"
        ratio8 = f"{ours8 / b8:.2f}x" if ours8 and name != "ours" else "-"
        roofline = bandwidth / decode_bytes_per_step(config, dtype)
        process = median(implementation, "process_peak_bytes")
        process = f"{process / gib:.2f}" if process else ""
        lines.append(
            f"| {implementation} | {b1:.2f} | {b8:.2f} | {ratio1} | {ratio8} | "
            f"{median(implementation, 'weight_bytes') / gib:.2f} | "
            f"{median(implementation, 'load_peak_bytes') / gib:.2f} | "
            f"{median(implementation, 'generate_peak_bytes') / gib:.2f} | {process} | {b1 / roofline:.0%} |"
        )
    lines.append("")
    for dtype in BYTES_PER_WEIGHT:
        step = decode_bytes_per_step(config, dtype)
        lines.append(
            f"Roofline {dtype}: {step / 1e9:.3f} GB per batch-1 step / {bandwidth / 1e9:.1f} GB/s = "
            f"{bandwidth / step:.1f} steps/s."
        )
    ours32 = median("ours:float32", "tokens_per_s_b1")
    for dtype in ("bfloat16", "int8"):
        value = median(f"ours:{dtype}", "tokens_per_s_b1")
        if ours32 and value:
            lines.append(f"Ours {dtype} / ours float32, batch 1: {value / ours32:.2f}x.")
    lines.append(f"{new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt; medians over rounds.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementations", nargs="+", default=IMPLEMENTATIONS, choices=IMPLEMENTATIONS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch size in each child")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--kernels", action="store_true", help="only time the output projection's product by dtype")
    parser.add_argument("--profile", nargs="+", choices=list(BYTES_PER_WEIGHT), help="split ours' decode step by part")
    parser.add_argument("--batch", type=int, default=1, help="batch size of --profile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.profile_child:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        if args.profile_child:
            return profile_child(args.profile_child, args.new_tokens, args.batch, args.dump)
        return child(args.child, args.checkpoint, args.new_tokens, args.repeats)
    if args.kernels:
        return kernels()
    if args.profile:
        return profile(args.profile, args.new_tokens, args.batch)

    started = time.perf_counter()
    bandwidth = _common.memory_bandwidth()
    # With its vision tower: `transformers` always builds one (ours and KerasHub's load text only).
    config = _common.released_config("270m-270m")
    print(
        f"CPU threads: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s",
        flush=True,
    )
    results = {implementation: [] for implementation in args.implementations}
    with tempfile.TemporaryDirectory() as directory:
        current, earlier = _common.write_random_checkpoint(config, directory)
        for dtype in {i.split(":")[1] for i in args.implementations if i.startswith("ctranslate2:")}:
            convert_for_ctranslate2(current, Path(current).parent / f"ctranslate2_{dtype}", dtype)
        for _ in range(args.rounds):
            for implementation in args.implementations:
                checkpoint = earlier if implementation.startswith("keras_hub") else current
                arguments = ["--child", implementation, "--checkpoint", checkpoint]
                arguments += ["--new-tokens", args.new_tokens, "--repeats", args.repeats]
                results[implementation].append(_common.run_child(__file__, arguments, implementation))
    print(report(config, results, bandwidth, args.new_tokens))
    print(f"\nTotal {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
