"""Long inputs: the 270m-270m text encoder at 2K-128K tokens, here and in the peers.

    python benchmarks/long_context.py                          # the default plan below
    python benchmarks/long_context.py --lengths 2048,8192 --skip-peers --no-generate --no-fit
    python benchmarks/long_context.py --lengths 32768,131072 --skip-peers   # e.g. on a GPU box

Each measurement runs in its own process, so its peak memory is its own:

- `encode` at each of `--lengths` (this package), `--dense-lengths` (this
  package forced onto its dense attention path, as before blockwise
  attention) and `--peer-lengths`
  (`transformers` with sdpa attention, and KerasHub's `T5Gemma2Backbone`):
  the 270m-270m config (tests/data), random weights, float32, batch 1.
  Keras encoders are compiled ahead of time (`jax.jit(...).lower().compile()`
  on JAX) and the run after compilation is timed, beside XLA's planned
  temporary buffers (`temp_bytes`); `--first-call` times the first call instead,
  compilation included, its peak counting the compiler's memory as a user
  meets it. `transformers` runs eagerly.
- `generate`: `--new-tokens` greedy tokens after a `--generate-length` input
  (this package), first call, so compilation and the encoding are included.
- `fit`: one `train_on_batch` step (AdamW) with a `--fit-length` encoder input
  and a `--fit-decoder-length` target, `remat=True`, first call (compilation
  included).

Peak memory is the resident-set high-water mark above the process's size once
the model is built (`/proc/self/status` VmHWM, reset through
`/proc/self/clear_refs`). The parent polls each child's resident size and
stops it above `--memory-limit-gib` (reported as "out of memory", as is a
child the kernel kills), so a run cannot take a shared machine down. Prints a
Markdown table; `--json` also writes the raw results.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

ROOT = Path(__file__).parents[1]
PEERS = ("transformers", "keras_hub")


def _float32_text_config():
    """The released config without `dtype` entries and without the vision tower."""

    config = _common.float32_config(_common.released_config("270m-270m"))
    config["encoder"].pop("vision_config", None)
    return config


# === Children ===


def _token_ids(length, vocabulary=262_144, seed=0):
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, min(vocabulary, 255_000), (1, length)).astype("int32")
    ids[:, 0] = 2
    return ids


def _our_backbone(remat=False):
    from keras_t5gemma.conversion.config import backbone_kwargs_from_hf_config
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

    kwargs = backbone_kwargs_from_hf_config(_float32_text_config())
    kwargs.pop("vision_config", None)
    kwargs.pop("mm_tokens_per_image", None)
    return T5Gemma2Backbone(**kwargs, remat=remat, dtype="float32")


def _keras_hub_backbone():
    from keras_hub.models import T5Gemma2Backbone

    config = _float32_text_config()
    text = config["decoder"]
    sizes = {}
    for side in ("encoder", "decoder"):
        sizes.update(
            {
                f"{side}_hidden_dim": text["hidden_size"],
                f"{side}_intermediate_dim": text["intermediate_size"],
                f"{side}_num_layers": text["num_hidden_layers"],
                f"{side}_num_attention_heads": text["num_attention_heads"],
                f"{side}_num_key_value_heads": text["num_key_value_heads"],
                f"{side}_head_dim": text["head_dim"],
                f"{side}_layer_types": text["layer_types"],
            }
        )
    return T5Gemma2Backbone(
        vocabulary_size=text["vocab_size"],
        **sizes,
        query_pre_attn_scalar=text["query_pre_attn_scalar"],
        sliding_window=text["sliding_window"],
        rope_max_wavelength=text["rope_parameters"]["sliding_attention"]["rope_theta"],
        global_rope_scaling_factor=text["rope_parameters"]["full_attention"]["factor"],
        dtype="float32",
    )


def _keras_encode(encode, backbone, length, first_call=False, plan=None):
    """Seconds of one compiled encoder run, and the peak above the built model.

    With `first_call`, the seconds and peak of the first call, compilation
    included; else `plan["temp_bytes"]` gets XLA's temporary buffer size.
    """
    plan = {} if plan is None else plan
    import keras
    import numpy as np

    ids = _token_ids(length)
    mask = np.ones_like(ids)
    baseline = _common.current_rss()
    _common.reset_peak_rss()
    if keras.config.backend() != "jax":
        encode(ids, mask)  # eager: the first call builds nothing new, but warms kernels
        started = time.perf_counter()
        output = keras.ops.convert_to_numpy(encode(ids, mask))
        return time.perf_counter() - started, _common.peak_rss() - baseline, output
    import jax

    variables = backbone.trainable_variables + backbone.non_trainable_variables
    state = [v.value for v in variables]

    def stateless(state, ids, mask):
        with keras.StatelessScope(state_mapping=list(zip(variables, state))):
            return encode(ids, mask)

    if first_call:
        # As a user meets it: tracing, compilation and the run, one peak.
        started = time.perf_counter()
        output = jax.jit(stateless)(state, ids, mask).block_until_ready()
        return time.perf_counter() - started, _common.peak_rss() - baseline, np.asarray(output)
    compiled = jax.jit(stateless).lower(state, ids, mask).compile()
    # XLA's own plan of the run's buffers beside the weights and the input.
    plan["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    started = time.perf_counter()
    output = compiled(state, ids, mask).block_until_ready()
    return time.perf_counter() - started, _common.peak_rss() - baseline, np.asarray(output)


def run_encode(implementation, length, first_call=False):
    plan = {}
    if implementation in ("keras_t5gemma", "keras_t5gemma_dense"):
        from keras_t5gemma.layers.blockwise_attention import blockwise_settings

        backbone = _our_backbone()
        # `keras_t5gemma_dense`: the dense path at any length (as before blockwise attention).
        dense = implementation == "keras_t5gemma_dense"
        with blockwise_settings(min_logits=2**62 if dense else None):
            seconds, peak, output = _keras_encode(backbone.encode, backbone, length, first_call, plan)
    elif implementation == "keras_hub":
        backbone = _keras_hub_backbone()

        def encode(ids, mask):
            inputs = {
                "encoder_token_ids": ids,
                "encoder_padding_mask": mask,
                "decoder_token_ids": ids[:, :1],
                "decoder_padding_mask": mask[:, :1],
            }
            return backbone(inputs)["encoder_sequence_output"]

        seconds, peak, output = _keras_encode(encode, backbone, length, first_call, plan)
    else:
        import torch
        from transformers import T5Gemma2Config
        from transformers import T5Gemma2ForConditionalGeneration

        config = _float32_text_config()
        config.pop("model_type", None)
        hf_config = T5Gemma2Config(**config)
        hf_config._attn_implementation = "sdpa"
        model = T5Gemma2ForConditionalGeneration(hf_config).eval()
        encoder = model.get_encoder()
        ids = torch.tensor(_token_ids(length)).long()
        baseline = _common.current_rss()
        _common.reset_peak_rss()
        with torch.no_grad():
            started = time.perf_counter()
            output = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            seconds = time.perf_counter() - started
        peak = _common.peak_rss() - baseline
        output = output.numpy()
    import numpy as np

    return {"seconds": seconds, "peak_bytes": peak, "finite": bool(np.isfinite(output).all()), **plan}


def run_generate(length, new_tokens):
    import numpy as np

    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    seq_2_seq_lm = T5Gemma2Seq2SeqLM(_our_backbone())
    seq_2_seq_lm.compile(sampler="greedy")
    ids = _token_ids(length)
    decoder = np.zeros((1, new_tokens + 1), "int32")
    decoder[:, 0] = 2
    inputs = {
        "encoder_token_ids": ids,
        "encoder_padding_mask": np.ones_like(ids),
        "decoder_token_ids": decoder,
        "decoder_padding_mask": (decoder > 0).astype("int32"),
    }
    baseline = _common.current_rss()
    _common.reset_peak_rss()
    started = time.perf_counter()
    output = seq_2_seq_lm.generate(inputs, stop_token_ids=None)
    seconds = time.perf_counter() - started
    tokens = np.asarray(output["decoder_token_ids"])
    return {"seconds": seconds, "peak_bytes": _common.peak_rss() - baseline, "distinct_tokens": len(np.unique(tokens))}


def run_fit(length, decoder_length):
    import keras
    import numpy as np

    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    seq_2_seq_lm = T5Gemma2Seq2SeqLM(_our_backbone(remat=True))
    seq_2_seq_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ids = _token_ids(length)
    targets = _token_ids(decoder_length, seed=1)
    x = {
        "encoder_token_ids": ids,
        "encoder_padding_mask": np.ones_like(ids),
        "decoder_token_ids": targets,
        "decoder_padding_mask": np.ones_like(targets),
    }
    baseline = _common.current_rss()
    _common.reset_peak_rss()
    started = time.perf_counter()
    loss = seq_2_seq_lm.train_on_batch(x, targets)
    seconds = time.perf_counter() - started
    loss = float(np.asarray(loss if not isinstance(loss, (list, tuple)) else loss[0]))
    return {"seconds": seconds, "peak_bytes": _common.peak_rss() - baseline, "loss": loss}


def child(task, implementation, length, args):
    if implementation == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    else:
        import keras

        import keras_t5gemma  # noqa: F401

        keras.ops.zeros(1)  # starts the backend
    if task == "encode":
        result = run_encode(implementation, length, args.first_call)
    elif task == "generate":
        result = run_generate(length, args.new_tokens)
    else:
        result = run_fit(length, args.fit_decoder_length)
    print("RESULT " + json.dumps(result), flush=True)


# === Parent ===


def _rss_of(pid):
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def measure(task, implementation, length, args):
    """Runs one child; its result dict, or `{"failed": reason}`."""
    environment = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    command = [
        sys.executable,
        __file__,
        "--child",
        task,
        implementation,
        str(length),
        "--new-tokens",
        str(args.new_tokens),
        "--fit-decoder-length",
        str(args.fit_decoder_length),
    ] + (["--first-call"] if args.first_call else [])
    limit = args.memory_limit_gib * 2**30
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reason, largest = None, 0
    while process.poll() is None:
        largest = max(largest, _rss_of(process.pid))
        if largest > limit:
            reason = f"out of memory (over the {args.memory_limit_gib} GiB limit)"
            process.send_signal(signal.SIGKILL)
        elif time.perf_counter() - started > args.timeout:
            reason = f"timed out after {args.timeout} s"
            process.send_signal(signal.SIGKILL)
        time.sleep(0.25)
    stdout, stderr = process.communicate()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "wall_s": time.perf_counter() - started}
    if reason is None:
        killed = process.returncode == -signal.SIGKILL
        reason = "out of memory (killed by the kernel)" if killed else f"failed: {stderr.strip()[-400:]}"
    return {"failed": reason}


def _cell(result):
    if "failed" in result:
        return result["failed"]
    return f"{result['seconds']:.1f} s, {result['peak_bytes'] / 2**30:.2f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192,32768", help="encoder lengths for this package")
    parser.add_argument("--peer-lengths", default="2048,8192", help="encoder lengths for the peers")
    parser.add_argument("--dense-lengths", default="2048,8192", help="lengths for this package's dense path")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--generate-length", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--fit-length", type=int, default=16384)
    parser.add_argument("--fit-decoder-length", type=int, default=256)
    parser.add_argument("--no-fit", action="store_true")
    parser.add_argument(
        "--first-call",
        action="store_true",
        help="Keras encodes: time and peak of the first call, tracing and compilation included",
    )
    parser.add_argument("--backend", default="jax", help="Keras backend of the Keras implementations")
    parser.add_argument("--memory-limit-gib", type=float, default=18.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "IMPLEMENTATION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, implementation, length = args.child
        child(task, implementation, int(length), args)
        return

    plan = [("encode", "keras_t5gemma", int(n)) for n in args.lengths.split(",") if n]
    if not args.no_generate:
        plan.append(("generate", "keras_t5gemma", args.generate_length))
    if not args.no_fit:
        plan.append(("fit", "keras_t5gemma", args.fit_length))
    plan += [("encode", "keras_t5gemma_dense", int(n)) for n in args.dense_lengths.split(",") if n]
    if not args.skip_peers:
        for implementation in args.peers.split(","):
            if implementation not in PEERS:
                parser.error(f"unknown peer {implementation!r}; choose from {PEERS}")
            plan += [("encode", implementation, int(n)) for n in args.peer_lengths.split(",") if n]

    results = []
    for task, implementation, length in plan:
        result = measure(task, implementation, length, args)
        results.append({"task": task, "implementation": implementation, "length": length, **result})
        print(f"{task:8s} {implementation:14s} {length:7d}: {_cell(result)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    print(f"\nbackend {args.backend}; seconds, peak resident memory above the built model\n")
    print("| task | implementation | tokens | result | seconds per 1K tokens |")
    print("|---|---|---|---|---|")
    for row in results:
        per_k = "" if "failed" in row else f"{1000 * row['seconds'] / row['length']:.2f}"
        print(f"| {row['task']} | {row['implementation']} | {row['length']:,} | {_cell(row)} | {per_k} |")


if __name__ == "__main__":
    main()
