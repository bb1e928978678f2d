"""Load on `keras-t5gemma serve`: 1, 4, 16 and 64 concurrent clients against its Keras and ONNX paths.

Starts one server on 127.0.0.1 (a free port) serving the preset through Keras
and its ONNX export, then for each path and client count sends a bounded number
of greedy completions (each client sends `--requests-per-client`, at most
`--max-seconds` per level) and checks every answer against `generate`'s. The
same prompts then run as sequential direct calls in this process (Keras
`generate`, `t5gemma_onnx` `generate`): the work without a server.

    python benchmarks/serve_load.py                      # the bundled demo preset
    python benchmarks/serve_load.py --clients 1,16 --requests-per-client 4

Prints a markdown table: requests/s, generated tokens/s, p50/p99 latency,
wrong or failed answers, and the two targets (16 clients >= 4x the tokens/s
of one client; a lone request's p50 <= 1.25x a direct `generate` call).
"""

import argparse
import os
import socket
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

from keras_t5gemma import demo  # noqa: E402
from keras_t5gemma.export import export_onnx  # noqa: E402
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM  # noqa: E402
from t5gemma_onnx import OnnxSeq2SeqLM  # noqa: E402


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(preset, onnx_folder, max_tokens, log_path):
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "keras_t5gemma",
        "serve",
        "--preset",
        f"keras={preset}",
        "--onnx",
        f"onnx={onnx_folder}",
        "--port",
        str(port),
        "--max-tokens",
        str(max_tokens),
        "--max-prompt-tokens",
        "128",
        "--batch-sizes",
        "1,4,16,64",
        "--max-queue",
        "512",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
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
    raise RuntimeError("the server did not become ready in 600 s")


def _level(url, model, clients, prompts, expected, requests_per_client, max_seconds, max_tokens):
    """One client count: latencies, generated tokens, wrong and failed answers, wall time."""
    latencies, tokens, wrong, failed = [], [0], [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client(index):
        with httpx.Client(base_url=url, timeout=120) as session:
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
    return _summary(latencies, tokens[0], time.perf_counter() - started, wrong[0], failed[0])


def _summary(latencies, tokens, seconds, wrong=0, failed=0):
    latencies = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_second": len(latencies) / seconds,
        "tokens_per_second": tokens / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "wrong": wrong,
        "failed": failed,
    }


def _direct(generate, count_tokens, prompts, requests):
    """Sequential direct calls, one prompt each (after one warm-up call)."""
    generate(prompts[0])
    latencies, tokens = [], 0
    started = time.perf_counter()
    for index in range(requests):
        begin = time.perf_counter()
        answer = generate(prompts[index % len(prompts)])
        latencies.append(time.perf_counter() - begin)
        tokens += count_tokens(answer)
    return _summary(latencies, tokens, time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5gemma2_tiny_digits")
    parser.add_argument("--clients", default="1,4,16,64", help="client counts (default: %(default)s)")
    parser.add_argument("--requests-per-client", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--min-requests", type=int, default=64, help="at least this many per level (default: 64)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per level (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=15, help="(default: %(default)s)")
    arguments = parser.parse_args()
    clients = [int(part) for part in arguments.clients.split(",")]

    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(arguments.preset)
    seq_2_seq_lm.compile(sampler="greedy")
    max_length = arguments.max_tokens + 1
    examples = demo.make_examples(["reverse", "sort"], 256, seed=21, held_out=True)
    prompts = [example.prompt for example in examples]
    expected = [seq_2_seq_lm.generate(prompt, max_length=max_length) for prompt in prompts]
    tokenizer = seq_2_seq_lm.preprocessor.tokenizer

    def count_tokens(answer):
        # The answer's tokens and its <eos> (what the server counts when the answer stops before max_tokens).
        return min(len(tokenizer(answer)) + 1, arguments.max_tokens)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        onnx_folder = Path(folder) / "onnx"
        export_onnx(seq_2_seq_lm, onnx_folder, max_decode_length=max_length)
        process, url = _start_server(arguments.preset, onnx_folder, arguments.max_tokens, Path(folder) / "server.log")
        try:
            for model in ("keras", "onnx"):
                # Loads (and for Keras warms up) before the clock starts.
                httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompts[0], "max_tokens": 2})
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
                    rows.append((model, f"server, {count} clients", result))
                    print(model, count, result, flush=True)
        finally:
            process.terminate()
            process.wait(timeout=120)
        requests = arguments.min_requests
        keras_generate = lambda prompt: seq_2_seq_lm.generate(prompt, max_length=max_length)  # noqa: E731
        keras_direct = _direct(keras_generate, count_tokens, prompts, requests)
        rows.append(("keras", "direct `generate`, sequential", keras_direct))
        runtime = OnnxSeq2SeqLM(onnx_folder)
        onnx_direct = _direct(lambda p: runtime.generate(p, max_length=max_length), count_tokens, prompts, requests)
        rows.append(("onnx", "direct `generate`, sequential", onnx_direct))

    print("\n| path | load | requests | requests/s | generated tokens/s | p50 ms | p99 ms | wrong | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, label, result in rows:
        print(
            f"| {model} | {label} | {result['requests']} | {result['requests_per_second']:.1f} | "
            f"{result['tokens_per_second']:.0f} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | "
            f"{result['wrong']} | {result['failed']} |"
        )
    for model in ("keras", "onnx"):
        by_label = {label: result for name, label, result in rows if name == model}
        one, sixteen = by_label.get("server, 1 clients"), by_label.get("server, 16 clients")
        direct = by_label["direct `generate`, sequential"]
        if one and sixteen:
            print(
                f"{model}: 16 clients / 1 client generated tokens/s = "
                f"{sixteen['tokens_per_second'] / one['tokens_per_second']:.2f}x (target >= 4x); "
                f"lone request p50 / direct generate p50 = {one['p50_ms'] / direct['p50_ms']:.2f}x (target <= 1.25x)"
            )


if __name__ == "__main__":
    main()
