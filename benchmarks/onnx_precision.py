"""ONNX precisions (fp32, fp16, int8, q4, q4f16) against each other: size, logit error, speed, memory.

    python benchmarks/onnx_precision.py                        # 270m-270m config, random weights
    python benchmarks/onnx_precision.py --config tiny          # quick
    python benchmarks/onnx_precision.py --precisions fp32,int8,q4 --rounds 5
    python benchmarks/onnx_precision.py --directory /tmp/exports --phases decode   # keep / reuse the exports

Each phase runs in a child process of its own, so that its peak memory is its own:

1. Export: a random-weight `T5Gemma2Seq2SeqLM` of the config (vision tower
   included) is exported once per precision, each into its own folder; the
   folder sizes are what a user of one precision downloads.
2. Load (one child per precision): the peak resident memory of the process
   after opening the encoder and decoder sessions and generating one token,
   above the interpreter with numpy and onnxruntime imported.
3. Decode, in one process: each round opens every precision's runtime in
   turn (one at a time, so that all five need not fit in memory together),
   warms it up and times it, then closes it. Logit error: the decoder
   logits of a 64-token prompt and a 16-token decoder prompt, against the
   fp32 graphs' (which match Keras float32 to 1e-5 of the logit
   scale, `tests/test_onnx_export.py`), as the largest difference over the
   largest fp32 logit, and how many positions keep fp32's argmax. Speed:
   greedy generation of `--new-tokens` tokens from a 64-token prompt at
   batch 1 and 8, interleaved (A, B, C, ..., A, B, ...) for `--rounds`
   rounds, each after a warm-up call; medians of generated tokens/s over the
   whole call (encoder, cross keys/values and decode), no stop tokens.

Greedy agreement on a trained model is measured on the demo preset by
`tests/test_onnx_precisions.py` (printed with `-s`). Timings compare only
within one run on one machine.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8", "q4", "q4f16")
PROMPT_TOKENS = 64
DECODER_PROMPT_TOKENS = 16


def config_for(name):
    return _common.tiny_config() if name == "tiny" else _common.released_config("270m-270m")


def export_phase(args):
    from keras_t5gemma.conversion.config import backbone_from_hf_config
    from keras_t5gemma.export import export_onnx
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    config = _common.float32_config(config_for(args.config))
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone_from_hf_config(config, text_only=False, dtype="float32"))
    results = {"parameters": seq_2_seq_lm.backbone.count_params()}
    length = max(args.new_tokens, DECODER_PROMPT_TOKENS) + 1
    for precision in args.precisions.split(","):
        folder = Path(args.directory) / precision
        started = time.perf_counter()
        export_onnx(seq_2_seq_lm, folder, max_decode_length=length, precision=precision)
        results[f"{precision}_export_s"] = time.perf_counter() - started
        results[f"{precision}_bytes"] = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    _common.print_results(results)


def load_phase(args):
    import numpy as np

    from t5gemma_onnx import OnnxSeq2SeqLM

    before = _common.current_rss()
    _common.reset_peak_rss()
    started = time.perf_counter()
    runtime = OnnxSeq2SeqLM(Path(args.directory) / args.precision, precision=args.precision)
    ids = np.full((1, 8), 5, "int64")
    ids[:, 0] = 2
    runtime.generate_token_ids(ids, np.ones_like(ids), decoder_token_ids=[[2]], max_length=2, stop_token_ids=None)
    _common.print_results({"load_s": time.perf_counter() - started, "peak_added_bytes": _common.peak_rss() - before})


def decode_phase(args):
    import gc

    import numpy as np

    from t5gemma_onnx import OnnxSeq2SeqLM

    precisions = args.precisions.split(",")
    vocabulary = OnnxSeq2SeqLM(Path(args.directory) / precisions[0], precision=precisions[0]).settings[
        "vocabulary_size"
    ]
    encoder_ids = _common.prompts(2, PROMPT_TOKENS, vocabulary, seed=7).astype("int64")
    decoder_ids = _common.prompts(2, DECODER_PROMPT_TOKENS, vocabulary, seed=8).astype("int64")
    length = args.new_tokens + 1

    def run(runtime, batch):
        ids = _common.prompts(batch, PROMPT_TOKENS, vocabulary).astype("int64")
        runtime.generate_token_ids(
            ids, np.ones_like(ids), decoder_token_ids=np.full((batch, 1), 2), max_length=length, stop_token_ids=None
        )

    logits = {}
    seconds = {(p, batch): [] for p in precisions for batch in (1, 8)}
    for round_index in range(args.rounds):
        for precision in precisions:
            runtime = OnnxSeq2SeqLM(Path(args.directory) / precision, precision=precision)
            if round_index == 0:
                logits[precision] = _chunk_logits(runtime, encoder_ids, decoder_ids)
            for batch in (1, 8):
                run(runtime, batch)  # warm-up
                started = time.perf_counter()
                run(runtime, batch)
                seconds[(precision, batch)].append(time.perf_counter() - started)
            del runtime
            gc.collect()
    results = {}
    if "fp32" in logits:
        # Logit error against fp32 on one prompt (batch 2), the decoder prompt as one chunk.
        reference = logits["fp32"]
        scale = float(np.abs(reference).max())
        for precision, values in logits.items():
            results[f"{precision}_logit_error"] = float(np.abs(values - reference).max()) / scale
            results[f"{precision}_argmax_agreement"] = float((values.argmax(-1) == reference.argmax(-1)).mean())
    for (precision, batch), times in seconds.items():
        results[f"{precision}_b{batch}_tokens_per_s"] = batch * args.new_tokens / statistics.median(times)
    _common.print_results(results)


def _chunk_logits(runtime, encoder_ids, decoder_ids):
    """float32 decoder logits `(B, T, V)` of a decoder prompt run as one chunk."""
    import numpy as np

    encoder = runtime._session("encoder")
    feeds = runtime._encoder_feeds(encoder_ids, np.ones_like(encoder_ids), None)
    encoded = dict(zip([output.name for output in encoder.get_outputs()], encoder.run(None, feeds)))
    decoder = runtime._session("decoder")
    settings = runtime.settings
    shape = (len(encoder_ids), settings["max_decode_length"], settings["num_key_value_heads"], settings["head_dim"])
    dtype = np.float16 if decoder.get_inputs()[3].type == "tensor(float16)" else np.float32
    decoder_feeds = {
        "encoder_padding_mask": feeds["encoder_padding_mask"],
        "decoder_token_ids": decoder_ids,
        "cache_position": np.array([0], "int64"),
    }
    for layer in range(settings["num_decoder_layers"]):
        decoder_feeds[f"past_key_{layer}"] = np.zeros(shape, dtype)
        decoder_feeds[f"past_value_{layer}"] = np.zeros(shape, dtype)
        decoder_feeds[f"cross_key_{layer}"] = encoded[f"cross_key_{layer}"]
        decoder_feeds[f"cross_value_{layer}"] = encoded[f"cross_value_{layer}"]
    return decoder.run(["logits"], decoder_feeds)[0].astype(np.float32)


def table(export, loads, decode, args):
    gib = 1024**3
    precisions = args.precisions.split(",")
    lines = [
        f"config {args.config}, random weights, {export['parameters']:,} parameters (vision tower included); "
        f"{args.new_tokens} new tokens from a {PROMPT_TOKENS}-token prompt, {args.rounds} interleaved rounds, "
        "medians",
        "",
        "| | " + " | ".join(precisions) + " |",
        "|---" * (len(precisions) + 1) + "|",
        "| folder (GiB) | " + " | ".join(f"{export[f'{p}_bytes'] / gib:.3f}" for p in precisions) + " |",
        "| export (s) | " + " | ".join(f"{export[f'{p}_export_s']:.1f}" for p in precisions) + " |",
        "| peak memory loading (GiB) | "
        + " | ".join(f"{loads[p]['peak_added_bytes'] / gib:.2f}" if loads.get(p) else "-" for p in precisions)
        + " |",
    ]
    if decode is not None:
        if "fp32_logit_error" in decode:
            lines.append(
                "| logit error / fp32 scale | "
                + " | ".join(f"{decode[f'{p}_logit_error']:.2g}" for p in precisions)
                + " |"
            )
            lines.append(
                "| argmax = fp32's | " + " | ".join(f"{decode[f'{p}_argmax_agreement']:.1%}" for p in precisions) + " |"
            )
        for batch in (1, 8):
            lines.append(
                f"| decode tokens/s, batch {batch} | "
                + " | ".join(f"{decode[f'{p}_b{batch}_tokens_per_s']:.1f}" for p in precisions)
                + " |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("270m", "tiny"), default="270m")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--directory", help="keep the exports in this folder (default: a temporary one)")
    parser.add_argument("--phases", default="export,load,decode", help="which phases to run (default: all)")
    parser.add_argument("--phase", choices=("export", "load", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        {"export": export_phase, "load": load_phase, "decode": decode_phase}[args.phase](args)
        return
    common = ["--config", args.config, "--new-tokens", args.new_tokens, "--rounds", args.rounds]
    common += ["--precisions", args.precisions]
    phases = args.phases.split(",")
    with tempfile.TemporaryDirectory() as temporary:
        directory = args.directory or temporary
        common += ["--directory", directory]
        results_file = Path(directory) / "export_results.json"
        if "export" in phases:
            export = _common.run_child(__file__, ["--phase", "export", *common], "export")
            if export is None:
                sys.exit(1)
            results_file.write_text(json.dumps(export))
        export = json.loads(results_file.read_text())
        loads = {}
        if "load" in phases:
            for p in args.precisions.split(","):
                loads[p] = _common.run_child(__file__, ["--phase", "load", "--precision", p, *common], f"load {p}")
        decode = None
        if "decode" in phases:
            decode = _common.run_child(__file__, ["--phase", "decode", *common], "decode")
    print(json.dumps({"export": export, "load": loads, "decode": decode}))
    print(table(export, loads, decode, args))


if __name__ == "__main__":
    main()
