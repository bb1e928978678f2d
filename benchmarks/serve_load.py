"""Load on `keras-t5gemma serve`: 1, 4, 16 and 64 concurrent clients against its Keras and ONNX paths.

The prompts first run as sequential direct calls in this process (Keras
`generate`, one prompt per call): their answers are the expected ones and
their timing the work without a server. Then one server on 127.0.0.1 (a free
port) serves the preset through Keras and its ONNX export, and for each path
and client count a bounded number of greedy completions (each client sends
`--requests-per-client`, at most `--max-seconds` per level) are checked
against those answers. `t5gemma_onnx`'s direct `generate` runs last.

`--random-config 270m-270m` serves the released config with random weights
instead: the checkpoint has no tokenizer, so the model is saved as a preset
folder with a stand-in vocabulary, the demo's SentencePiece model extended
with filler pieces (`<w300>`, ...) to the model's 262,144 rows. The demo's
prompts encode to the same ids as with the demo's own vocabulary (no filler
piece can be merged from their text); a random model's answers are filler
pieces, checked exactly against the direct greedy answers as for the demo.

    python benchmarks/serve_load.py                      # the bundled demo preset
    python benchmarks/serve_load.py --clients 1,16 --requests-per-client 4
    python benchmarks/serve_load.py --random-config 270m-270m --paths keras --prompts 16 \
        --requests-per-client 4 --min-requests 4 --max-prompt-tokens 16 --max-seconds 90 --rounds 2

(the random preset's preprocessor pads prompts to `--max-prompt-tokens`, the
server's one length bucket then, so that both encode the same length).
`--rounds` runs every level again in turn (A, B, C, A, B, C: the rates are
medians over rounds, the latencies pooled).

Prints a markdown table: requests/s, generated tokens/s, p50/p99 latency,
rows per batch and the mean time to the first token (from the server's
/metrics), wrong or failed answers, and the two targets (16 clients >= 4x the tokens/s
of one client; a lone request's p50 <= 1.25x a direct `generate` call).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402

from keras_t5gemma import demo  # noqa: E402
from keras_t5gemma.export import export_onnx  # noqa: E402
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM  # noqa: E402
from t5gemma_onnx import OnnxSeq2SeqLM  # noqa: E402

STAND_IN_PIECE = "<w{}>"


def write_random_preset(config_name, folder, dtype=None, encoder_sequence_length=32):
    """A preset folder of the released `config_name` with random weights (text only) and a stand-in vocabulary.

    The vocabulary is the demo's SentencePiece model with NORMAL filler pieces
    appended up to the model's vocabulary size; their scores are below every
    real piece's and their text (`<w300>`, ...) holds characters no demo prompt
    has, so no prompt encodes to one, while any generated id decodes to text.
    """
    import keras
    from sentencepiece import sentencepiece_model_pb2

    from keras_t5gemma.conversion.config import backbone_from_hf_config
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor
    from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import T5Gemma2Tokenizer

    keras.utils.set_random_seed(0)
    backbone = backbone_from_hf_config(_common.released_config(config_name), text_only=True, dtype=dtype)
    demo_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    vocabulary = sentencepiece_model_pb2.ModelProto()
    vocabulary.ParseFromString(demo_lm.preprocessor.tokenizer.proto)
    lowest = min(piece.score for piece in vocabulary.pieces)
    for index in range(len(vocabulary.pieces), backbone.vocabulary_size):
        piece = vocabulary.pieces.add()
        piece.piece, piece.score = STAND_IN_PIECE.format(index), lowest - 1 - index
    preprocessor = T5Gemma2Seq2SeqLMPreprocessor(
        T5Gemma2Tokenizer(proto=vocabulary.SerializeToString()),
        encoder_sequence_length=encoder_sequence_length,
        decoder_sequence_length=demo_lm.preprocessor.decoder_sequence_length,
    )
    T5Gemma2Seq2SeqLM(backbone, preprocessor).save_to_preset(str(folder))


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(preset, onnx_folder, arguments, log_path):
    port = _free_port()
    command = [sys.executable, "-m", "keras_t5gemma", "serve", "--preset", f"keras={preset}", "--port", str(port)]
    if onnx_folder is not None:
        command += ["--onnx", f"onnx={onnx_folder}"]
    command += ["--max-tokens", str(arguments.max_tokens), "--max-prompt-tokens", str(arguments.max_prompt_tokens)]
    command += ["--batch-sizes", arguments.batch_sizes, "--max-queue", "512", "--request-timeout", "900"]
    command += ["--batch-wait-ms", str(arguments.batch_wait_ms)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited:\n" + Path(log_path).read_text()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not become ready in 1800 s")


def _batch_counters(url, model):
    """The server's `(batches, rows, time-to-first-token seconds summed)` so far for `model` (from /metrics)."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        for name in ("t5gemma_batch_size_count", "t5gemma_batch_size_sum", "t5gemma_time_to_first_token_seconds_sum"):
            if line.startswith(f'{name}{{model="{model}"}}'):
                values[name] = float(line.split()[-1])
    return (
        values.get("t5gemma_batch_size_count", 0.0),
        values.get("t5gemma_batch_size_sum", 0.0),
        values.get("t5gemma_time_to_first_token_seconds_sum", 0.0),
    )


def _level(url, model, clients, prompts, expected, requests_per_client, max_seconds, max_tokens):
    """One client count: latencies, generated tokens, wrong and failed answers, wall time, batch sizes."""
    before = _batch_counters(url, model)
    latencies, tokens, wrong, failed = [], [0], [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client(index):
        with httpx.Client(base_url=url, timeout=900) as session:
            for request in range(requests_per_client):
                if time.monotonic() > deadline:
                    return
                which = (index * requests_per_client + request) % len(prompts)
                body = {"model": model, "prompt": prompts[which], "max_tokens": max_tokens, "temperature": 0}
                started = time.perf_counter()
                try:
                    response = session.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    with lock:
                        failed[0] += 1
                    continue
                seconds = time.perf_counter() - started
                with lock:
                    if response.status_code != 200:
                        failed[0] += 1
                        continue
                    answer = response.json()
                    latencies.append(seconds)
                    tokens[0] += answer["usage"]["completion_tokens"]
                    wrong[0] += answer["choices"][0]["text"] != expected[which]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = _summary(latencies, tokens[0], time.perf_counter() - started, wrong[0], failed[0])
    batches, rows, first_token_seconds = (
        after - earlier for after, earlier in zip(_batch_counters(url, model), before)
    )
    summary["batches"], summary["rows"], summary["first_token_seconds"] = batches, rows, first_token_seconds
    return summary


def _summary(latencies, tokens, seconds, wrong=0, failed=0):
    return {
        "requests": len(latencies),
        "requests_per_second": len(latencies) / seconds,
        "tokens_per_second": tokens / seconds,
        "latencies_ms": [latency * 1000 for latency in latencies],
        "wrong": wrong,
        "failed": failed,
    }


def _direct(generate, count_tokens, prompts, expected=None):
    """Sequential direct calls, one per prompt (after one warm-up call); their answers and summary."""
    generate(prompts[0])
    latencies, tokens, answers = [], 0, []
    started = time.perf_counter()
    for prompt in prompts:
        begin = time.perf_counter()
        answers.append(generate(prompt))
        latencies.append(time.perf_counter() - begin)
        tokens += count_tokens(answers[-1])
    wrong = 0 if expected is None else sum(answer != want for answer, want in zip(answers, expected))
    return answers, _summary(latencies, tokens, time.perf_counter() - started, wrong)


def _combined(results):
    """Rounds of one row: medians of the rates, latency percentiles over every request, sums of the counts."""
    latencies = [latency for result in results for latency in result["latencies_ms"]]
    percentile = lambda q: float(np.percentile(latencies, q)) if latencies else float("nan")  # noqa: E731
    return {
        "requests": sum(result["requests"] for result in results),
        "requests_per_second": statistics.median(result["requests_per_second"] for result in results),
        "tokens_per_second": statistics.median(result["tokens_per_second"] for result in results),
        "p50_ms": percentile(50),
        "p99_ms": percentile(99),
        "wrong": sum(result["wrong"] for result in results),
        "failed": sum(result["failed"] for result in results),
        "rows_per_batch": _ratio(results, "rows", "batches"),
        "first_token_ms": 1000 * _ratio(results, "first_token_seconds", "rows"),
    }


def _ratio(results, numerator, denominator):
    total = sum(result.get(denominator, 0) for result in results)
    return sum(result.get(numerator, 0) for result in results) / total if total else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5gemma2_tiny_digits")
    parser.add_argument(
        "--random-config", help="serve this released config (e.g. 270m-270m) with random weights instead"
    )
    parser.add_argument("--dtype", help="the random config's dtype (default: float32)")
    parser.add_argument(
        "--random-preset-folder", help="where the random preset is written (reused if it is there; default: a temp)"
    )
    parser.add_argument("--paths", default="keras,onnx", help="(default: %(default)s)")
    parser.add_argument("--clients", default="1,4,16,64", help="client counts (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=256, help="distinct held-out prompts (default: %(default)s)")
    parser.add_argument("--requests-per-client", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--min-requests", type=int, default=64, help="at least this many per level (default: 64)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per level (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=15, help="(default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="the server's buckets (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="the server's (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over every level, interleaved (default: 1)")
    arguments = parser.parse_args()
    clients = [int(part) for part in arguments.clients.split(",")]
    paths = arguments.paths.split(",")

    max_length = arguments.max_tokens + 1
    examples = demo.make_examples(["reverse", "sort"], arguments.prompts, seed=21, held_out=True)
    prompts = [example.prompt for example in examples]
    results = {}  # (path, label) -> one summary per round
    with tempfile.TemporaryDirectory() as folder:
        preset = arguments.preset
        if arguments.random_config:
            preset = arguments.random_preset_folder or str(Path(folder) / "preset")
            if not (Path(preset) / "config.json").exists():
                started = time.perf_counter()
                write_random_preset(arguments.random_config, preset, arguments.dtype, arguments.max_prompt_tokens)
                print(f"wrote the random preset in {time.perf_counter() - started:.0f} s", flush=True)
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(preset)
        seq_2_seq_lm.compile(sampler="greedy")
        tokenizer = seq_2_seq_lm.preprocessor.tokenizer

        def count_tokens(answer):
            # The answer's tokens and its <eos> (what the server counts when the answer stops before max_tokens).
            return min(len(tokenizer(answer)) + 1, arguments.max_tokens)

        def keras_generate(prompt):
            return seq_2_seq_lm.generate(prompt, max_length=max_length)

        expected, direct = _direct(keras_generate, count_tokens, prompts)
        results[("keras", "direct `generate`, sequential")] = [direct]
        print("keras direct", _combined([direct]), flush=True)
        onnx_folder = None
        if "onnx" in paths:
            onnx_folder = Path(folder) / "onnx"
            export_onnx(seq_2_seq_lm, onnx_folder, max_decode_length=max_length)
        process, url = _start_server(preset, onnx_folder, arguments, Path(folder) / "server.log")
        try:
            for model in paths:
                # Loads (and warms up) before the clock starts.
                httpx.post(
                    url + "/v1/completions",
                    json={"model": model, "prompt": prompts[0], "max_tokens": 2},
                    timeout=1800,
                )
            for round_index in range(arguments.rounds):
                if round_index:
                    results[("keras", "direct `generate`, sequential")].append(
                        _direct(keras_generate, count_tokens, prompts, expected)[1]
                    )
                for model in paths:
                    for count in clients:
                        per_client = max(arguments.requests_per_client, -(-arguments.min_requests // count))
                        result = _level(
                            url,
                            model,
                            count,
                            prompts,
                            expected,
                            per_client,
                            arguments.max_seconds,
                            arguments.max_tokens,
                        )
                        results.setdefault((model, f"server, {count} clients"), []).append(result)
                        print(model, count, _combined([result]), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=900)
        if "onnx" in paths:
            runtime = OnnxSeq2SeqLM(onnx_folder)
            onnx_generate = lambda prompt: runtime.generate(prompt, max_length=max_length)  # noqa: E731
            results[("onnx", "direct `generate`, sequential")] = [
                _direct(onnx_generate, count_tokens, prompts, expected)[1]
            ]

    print(
        "\n| path | load | requests | requests/s | generated tokens/s | p50 ms | p99 ms | rows per batch "
        "| mean first token ms | wrong | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = sorted(results.items(), key=lambda item: (item[0][1].startswith("direct"), paths.index(item[0][0])))
    combined = {key: _combined(value) for key, value in rows}
    for (model, label), result in combined.items():
        print(
            f"| {model} | {label} | {result['requests']} | {result['requests_per_second']:.2f} | "
            f"{result['tokens_per_second']:.1f} | {result['p50_ms']:.0f} | {result['p99_ms']:.0f} | "
            f"{result['rows_per_batch']:.1f} | {result['first_token_ms']:.0f} | "
            f"{result['wrong']} | {result['failed']} |"
        )
    for model in paths:
        one, sixteen = combined.get((model, "server, 1 clients")), combined.get((model, "server, 16 clients"))
        direct = combined[(model, "direct `generate`, sequential")]
        if one and sixteen:
            print(
                f"{model}: 16 clients / 1 client generated tokens/s = "
                f"{sixteen['tokens_per_second'] / one['tokens_per_second']:.2f}x (target >= 4x); "
                f"lone request p50 / direct generate p50 = {one['p50_ms'] / direct['p50_ms']:.2f}x (target <= 1.25x)"
            )


if __name__ == "__main__":
    main()
