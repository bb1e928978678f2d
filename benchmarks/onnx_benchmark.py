"""ONNX export and runtime against this package's JAX `generate` and `transformers`.

    python benchmarks/onnx_benchmark.py                      # 270m-270m config, random weights
    python benchmarks/onnx_benchmark.py --config tiny        # quick
    python benchmarks/onnx_benchmark.py --new-tokens 16 --rounds 3

Two processes, so that each phase's peak memory is its own:

1. Export: a random-weight `T5Gemma2Seq2SeqLM` of the config (vision tower
   included) is exported to ONNX in float32 and int8; it reports the export
   times, the folder sizes and the peak resident memory the export adds
   above the loaded Keras model.
2. Decode: greedy generation of `--new-tokens` tokens from a 64-token prompt
   at batch 1 and 8, for the ONNX runtime (float32, int8), the Keras/JAX
   `generate` and `transformers.generate`, run interleaved (A, B, C, D, A,
   B, ...) for `--rounds` rounds after one warm-up call each; medians. To
   fit all four in memory at once the models are text-only (no vision
   tower), each with its own random weights; no stop tokens, so every
   implementation does the same work. Tokens/s counts generated tokens over
   the whole call (encoder, cross keys/values and decode).

Timings are comparable only within one run on one machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

ROOT = Path(__file__).parents[1]
PROMPT_TOKENS = 64


def config_for(name):
    return _common.tiny_config() if name == "tiny" else _common.released_config("270m-270m")


def _rss(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def _folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file())


def keras_model(config, text_only):
    from keras_t5gemma.conversion.config import backbone_from_hf_config
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    return T5Gemma2Seq2SeqLM(
        backbone_from_hf_config(_common.float32_config(config), text_only=text_only, dtype="float32")
    )


def export_phase(config_name, max_decode_length, directory):
    from keras_t5gemma.export import export_onnx

    seq_2_seq_lm = keras_model(config_for(config_name), text_only=False)
    parameters = seq_2_seq_lm.backbone.count_params()
    results = {"parameters": parameters, "float32_weight_bytes": 4 * parameters}
    for quantize in (None, "int8"):
        name = quantize or "float32"
        folder = Path(directory) / f"export_{name}"
        before = _rss("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        export_onnx(seq_2_seq_lm, folder, max_decode_length=max_decode_length, quantize=quantize)
        results[f"{name}_export_s"] = time.perf_counter() - started
        results[f"{name}_export_peak_added_bytes"] = _rss("VmHWM") - before
        results[f"{name}_bytes"] = _folder_bytes(folder)
    return results


def decode_phase(config_name, new_tokens, rounds, directory):
    import numpy as np
    import torch
    from transformers import T5Gemma2Config
    from transformers import T5Gemma2ForConditionalGeneration

    from keras_t5gemma.export import export_onnx
    from t5gemma_onnx import OnnxSeq2SeqLM

    config = config_for(config_name)
    vocabulary = config["decoder"]["vocab_size"]
    length = new_tokens + 1
    seq_2_seq_lm = keras_model(config, text_only=True)
    seq_2_seq_lm.compile(sampler="greedy")
    runtimes = {}
    for quantize in (None, "int8"):
        folder = Path(directory) / f"decode_{quantize or 'float32'}"
        export_onnx(seq_2_seq_lm, folder, max_decode_length=length, quantize=quantize)
        runtimes[quantize or "float32"] = OnnxSeq2SeqLM(folder)
    torch.manual_seed(0)
    hf_config = T5Gemma2Config(**{k: v for k, v in _common.float32_config(config).items() if k != "model_type"})
    reference = T5Gemma2ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.02)
    # Text-only prompts never reach the vision tower; drop its weights from memory.
    reference.model.encoder.vision_tower = None

    def prompts(batch):
        ids = np.random.default_rng(batch).integers(3, min(vocabulary, 255_000), (batch, PROMPT_TOKENS))
        ids[:, 0] = 2
        return ids.astype("int64")

    def onnx_run(runtime):
        def run(batch):
            ids = prompts(batch)
            runtime.generate_token_ids(
                ids,
                np.ones_like(ids),
                decoder_token_ids=np.full((batch, 1), 2),
                max_length=length,
                stop_token_ids=None,
            )

        return run

    def jax_run(batch):
        ids = prompts(batch).astype("int32")
        decoder = np.zeros((batch, length), "int32")
        decoder[:, 0] = 2
        seq_2_seq_lm.generate(
            {
                "encoder_token_ids": ids,
                "encoder_padding_mask": np.ones_like(ids),
                "decoder_token_ids": decoder,
                "decoder_padding_mask": (decoder > 0).astype("int32"),
            },
            stop_token_ids=None,
        )

    def transformers_run(batch):
        ids = torch.tensor(prompts(batch))
        with torch.no_grad():
            reference.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
            )

    implementations = {
        "onnx_float32": onnx_run(runtimes["float32"]),
        "onnx_int8": onnx_run(runtimes["int8"]),
        "keras_jax": jax_run,
        "transformers": transformers_run,
    }
    seconds = {(name, batch): [] for name in implementations for batch in (1, 8)}
    for batch in (1, 8):
        for run in implementations.values():
            run(batch)  # warm-up: compilation, session initialisation
    for _ in range(rounds):
        for batch in (1, 8):
            for name, run in implementations.items():
                started = time.perf_counter()
                run(batch)
                seconds[(name, batch)].append(time.perf_counter() - started)
    return {
        f"{name}_b{batch}_tokens_per_s": batch * new_tokens / statistics.median(times)
        for (name, batch), times in seconds.items()
    }


def table(export, decode, args):
    gib = 1024**3
    lines = [
        f"config {args.config}, random weights, {export['parameters']:,} parameters; "
        f"{args.new_tokens} new tokens from a {PROMPT_TOKENS}-token prompt, {args.rounds} interleaved rounds, medians",
        "",
        "| | float32 | int8 |",
        "|---|---|---|",
        f"| export time (s) | {export['float32_export_s']:.1f} | {export['int8_export_s']:.1f} |",
        f"| folder size (GiB) | {export['float32_bytes'] / gib:.2f} | {export['int8_bytes'] / gib:.2f} "
        f"({export['int8_bytes'] / export['float32_bytes']:.0%}) |",
        f"| export peak memory above the loaded model (GiB) | {export['float32_export_peak_added_bytes'] / gib:.2f} "
        f"| {export['int8_export_peak_added_bytes'] / gib:.2f} |",
        "",
        f"float32 weights: {export['float32_weight_bytes'] / gib:.2f} GiB",
        "",
        "| decode tokens/s | batch 1 | batch 8 |",
        "|---|---|---|",
    ]
    for name in ("onnx_float32", "onnx_int8", "keras_jax", "transformers"):
        lines.append(f"| {name} | {decode[f'{name}_b1_tokens_per_s']:.1f} | {decode[f'{name}_b8_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("270m", "tiny"), default="270m")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase", choices=("export", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "export":
        print(json.dumps(export_phase(args.config, args.new_tokens + 1, args.directory)))
        return
    if args.phase == "decode":
        print(json.dumps(decode_phase(args.config, args.new_tokens, args.rounds, args.directory)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for phase in ("export", "decode"):
            command = [
                sys.executable,
                __file__,
                "--phase",
                phase,
                "--directory",
                directory,
                "--config",
                args.config,
                "--new-tokens",
                str(args.new_tokens),
                "--rounds",
                str(args.rounds),
            ]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            env.setdefault("KERAS_BACKEND", "jax")
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
            results[phase] = json.loads(output.strip().splitlines()[-1])
            print(phase, results[phase], flush=True)
    print(table(results["export"], results["decode"], args))


if __name__ == "__main__":
    main()
