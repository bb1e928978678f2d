"""`keras-t5gemma serve` against a real server process on 127.0.0.1, with the `openai` client and plain HTTP.

One server serves the whole module (the bundled demo preset; its ONNX export
under two more names, written by this process while the server warms up).
Answers are compared with `T5Gemma2Seq2SeqLM.generate` (greedy) and
`T5Gemma2Embedder.predict` in this process. The SIGTERM test runs last: it
stops the server.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client import generate_latest

from keras_t5gemma import demo as demo_tasks
from keras_t5gemma.export import export_onnx
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

DEMO = "t5gemma2_tiny_digits"
API_KEY = "test-key"
MAX_TOKENS = 15
MAX_PROMPT_TOKENS = 128
MAX_QUEUE = 32
MAX_IMAGE_PIXELS = 4096
MAX_BODY_BYTES = 2**20
STARTUP_SECONDS = 300


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server process, its base URL, its log file and the ONNX folder it serves (written after start)."""
    port = _free_port()
    onnx_folder = tmp_path_factory.mktemp("serve") / "digits_onnx"
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    command = [
        sys.executable,
        "-m",
        "keras_t5gemma",
        "serve",
        "--preset",
        DEMO,
        "--onnx",
        f"onnx-a={onnx_folder}",
        "--onnx",
        f"onnx-b={onnx_folder}",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--batch-sizes",
        "1,16",
        "--max-prompt-tokens",
        str(MAX_PROMPT_TOKENS),
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-images",
        "1",
        "--max-image-pixels",
        str(MAX_IMAGE_PIXELS),
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
        "--max-queue",
        str(MAX_QUEUE),
        "--max-loaded-models",
        "2",
    ]
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        yield {"process": process, "url": url, "log": log_path, "onnx": onnx_folder}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def seq_2_seq_lm(server):
    """The demo model in this process (and its ONNX export, which the server loads on first use)."""
    model = T5Gemma2Seq2SeqLM.from_preset(DEMO)
    model.compile(sampler="greedy")
    # Chat prompts (Gemma's turn template) are longer than the preset's 32 tokens.
    model.preprocessor.encoder_sequence_length = MAX_PROMPT_TOKENS
    export_onnx(model, server["onnx"], max_decode_length=MAX_TOKENS + 1)
    return model


@pytest.fixture(scope="module")
def ready(server, seq_2_seq_lm):
    """The server, once `/health` says ready."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert server["process"].poll() is None, server["log"].read_text()[-3000:]
        try:
            if httpx.get(server["url"] + "/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail("the server did not become ready:\n" + server["log"].read_text()[-3000:])


@pytest.fixture(scope="module")
def client(ready):
    return openai.OpenAI(base_url=ready["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(ready):
    with httpx.Client(base_url=ready["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as session:
        yield session


def _prompts(count, seed):
    examples = demo_tasks.make_examples(["reverse", "sort"], count, seed=seed, held_out=True)
    return [example.prompt for example in examples]


def _expected(seq_2_seq_lm, prompts):
    return [seq_2_seq_lm.generate(prompt, max_length=MAX_TOKENS + 1) for prompt in prompts]


def _png_data_url(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _sse_events(response):
    """The `data:` payloads of a streamed response, `[DONE]` included."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def _chat_prompt(text):
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


# === Routes and answers ===


def test_health_needs_no_key_and_models_are_listed(ready, client, http):
    health = httpx.get(ready["url"] + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert [model.id for model in client.models.list()] == [DEMO, "onnx-a", "onnx-b"]
    termite = http.get("/api/models").json()
    assert termite["rewriters"] == [DEMO, "onnx-a", "onnx-b"] and termite["loaded"] == [DEMO]


def test_completions_equal_generate(client, seq_2_seq_lm):
    prompts = _prompts(4, seed=3)
    expected = _expected(seq_2_seq_lm, prompts)
    answers = [
        client.completions.create(model=DEMO, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        for prompt in prompts
    ]
    assert answers == expected
    batch = client.completions.create(model=DEMO, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    assert [choice.text for choice in sorted(batch.choices, key=lambda choice: choice.index)] == expected
    assert batch.usage.completion_tokens > 0 and batch.usage.prompt_tokens > 0
    assert all(choice.finish_reason == "stop" for choice in batch.choices)


def test_streamed_completions_equal_generate(client, http, seq_2_seq_lm):
    prompts = _prompts(3, seed=4)
    expected = _expected(seq_2_seq_lm, prompts)
    for prompt, answer in zip(prompts, expected):
        chunks = list(
            client.completions.create(model=DEMO, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        )
        assert len(chunks) > 2  # token by token, then the finish reason
        assert "".join(chunk.choices[0].text for chunk in chunks) == answer
        assert chunks[-1].choices[0].finish_reason == "stop"
    body = {"model": DEMO, "prompt": prompts[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1]) == expected[0]


def test_max_tokens_and_stop(client, seq_2_seq_lm):
    prompt = "reverse: 1 2 3 4 5 6 7 8"
    full = seq_2_seq_lm.generate(prompt, max_length=MAX_TOKENS + 1)
    short = client.completions.create(model=DEMO, prompt=prompt, max_tokens=3, temperature=0).choices[0]
    assert short.finish_reason == "length" and short.text == seq_2_seq_lm.generate(prompt, max_length=4)
    stopped = client.completions.create(model=DEMO, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=" 4")
    assert stopped.choices[0].text == full[: full.index(" 4")]


def test_seeded_sampling_repeats(client):
    settings = {"model": DEMO, "prompt": "sort: 5 3 9 1", "max_tokens": MAX_TOKENS, "temperature": 1.5, "top_k": 50}
    first = client.completions.create(**{k: v for k, v in settings.items() if k != "top_k"}, seed=7, n=3)
    second = client.completions.create(**{k: v for k, v in settings.items() if k != "top_k"}, seed=7, n=3)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 3


def test_chat_with_an_image_answers_as_in_python(client, http, seq_2_seq_lm):
    image = np.zeros((8, 8, 3), "uint8") + np.array(demo_tasks.COLORS["blue"], "uint8")
    prompt = _chat_prompt("color: <start_of_image>")
    expected = seq_2_seq_lm.generate({"encoder_text": [prompt], "images": [[image]]}, max_length=MAX_TOKENS + 1)[0]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "color: "},
                {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
            ],
        }
    ]
    answer = client.chat.completions.create(model=DEMO, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=DEMO, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected
    text_expected = seq_2_seq_lm.generate(_chat_prompt("sort: 3 1 2"), max_length=MAX_TOKENS + 1)
    text = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "sort: 3 1 2"}], "temperature": 0, "max_tokens": MAX_TOKENS},
    )
    assert text.json()["choices"][0]["message"]["content"] == text_expected


def test_embeddings_equal_the_embedder(client, http):
    embedder = T5Gemma2Embedder.from_preset(DEMO)
    texts = ["sort: 1 2", "reverse: 9 8 7", "sort: 2 1"]
    image = np.zeros((8, 8, 3), "uint8") + np.array(demo_tasks.COLORS["red"], "uint8")
    expected = embedder.predict(texts + [{"images": [image]}])
    vectors = [item.embedding for item in client.embeddings.create(model=DEMO, input=texts).data]
    np.testing.assert_allclose(np.array(vectors), expected[:3], atol=1e-5)
    termite = {"model": DEMO, "input": [texts[0], {"type": "image_url", "image_url": {"url": _png_data_url(image)}}]}
    response = http.post("/v1/embeddings", json={**termite, "encoding_format": "float"}).json()
    got = np.array([item["embedding"] for item in sorted(response["data"], key=lambda item: item["index"])])
    np.testing.assert_allclose(got, expected[[0, 3]], atol=1e-5)
    assert response["usage"]["prompt_tokens"] > 0


def test_termite_rewrite(http, seq_2_seq_lm):
    texts = _prompts(2, seed=5)
    response = http.post("/api/rewrite", json={"model": DEMO, "texts": texts, "max_tokens": MAX_TOKENS}).json()
    assert [output["text"] for output in response["outputs"]] == _expected(seq_2_seq_lm, texts)
    assert all(output["tokens"] > 0 for output in response["outputs"])


# === Load ===


def test_64_concurrent_requests_from_16_threads(client, http, seq_2_seq_lm):
    prompts = _prompts(64, seed=6)
    expected = _expected(seq_2_seq_lm, prompts)

    def ask(prompt):
        return client.completions.create(model=DEMO, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        answers = [response.choices[0].text for response in pool.map(ask, prompts)]
    assert answers == expected
    metrics = http.get("/metrics").text
    batches = float(_metric(metrics, "t5gemma_batch_size_count", DEMO))
    rows = float(_metric(metrics, "t5gemma_batch_size_sum", DEMO))
    assert rows / batches > 1.5, "concurrent requests were not batched"


def _metric(text, name, model):
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no {name} for {model} in /metrics")


def test_closed_loop_clients_come_back_into_one_batch():
    """Clients that send their next prompt when answered, a few ms apart (as HTTP answers come back), are
    decoded in one batch per turn: the worker waits for the last batch's rows rather than starting on the
    first to return (which split each turn in two). Answers equal `generate`'s."""
    from keras_t5gemma.serving.batching import Batcher
    from keras_t5gemma.serving.batching import Row
    from keras_t5gemma.serving.batching import SamplingSettings
    from keras_t5gemma.serving.engines import KerasEngine
    from keras_t5gemma.serving.metrics import ServerMetrics

    engine = KerasEngine(DEMO)
    metrics = ServerMetrics()
    # A wait of up to 50 batch times: a loaded CI machine may wake the clients late, never by that much.
    batcher = Batcher(engine, [1, 4], [32], [MAX_TOKENS + 1], 0, 16, companion_wait=50.0, metrics=metrics)
    clients, turns = 4, 3
    prompts = _prompts(clients * turns, seed=13)
    answers = {}

    def row(which, done):
        pieces = []

        def emit(event):
            if event[0] == "delta":
                pieces.append(event[1])
            else:
                answers[which] = "".join(pieces) if event[0] == "done" else event
                done.set()

        prompt = engine.prepare(prompts[which], [], 32)
        return Row(prompt, MAX_TOKENS, SamplingSettings(temperature=0), (), emit, time.monotonic() + 120)

    def client(index, first_done):
        first_done.wait(120)
        for turn in range(1, turns):
            time.sleep(0.003 * index)
            done = threading.Event()
            batcher.submit([row(turn * clients + index, done)])
            done.wait(120)

    try:
        firsts = [threading.Event() for _ in range(clients)]
        threads = [threading.Thread(target=client, args=(index, firsts[index])) for index in range(clients)]
        for thread in threads:
            thread.start()
        batcher.submit([row(index, firsts[index]) for index in range(clients)])  # the first turn: one batch
        for thread in threads:
            thread.join(120)
    finally:
        batcher.close()
    expected = [engine.seq_2_seq_lm.generate(prompt, max_length=MAX_TOKENS + 1) for prompt in prompts]
    assert [answers.get(which) for which in range(len(prompts))] == expected
    batches = float(_metric(generate_latest(metrics.registry).decode(), "t5gemma_batch_size_count", "model"))
    assert batches == turns, f"{clients} clients' {turns} turns took {batches:.0f} batches"


def test_overload_is_refused_with_429_and_nothing_else_is_lost(ready, seq_2_seq_lm):
    prompts = _prompts(8, seed=8)
    expected = _expected(seq_2_seq_lm, prompts)
    body = {"model": DEMO, "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def ask(_):
        return httpx.post(ready["url"] + "/v1/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(ask, range(24)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses, statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "queue_full"
        else:
            choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
            assert [choice["text"] for choice in choices] == expected


def _bad_requests(url):
    big_image = _png_data_url(np.zeros((80, 80, 3), "uint8"))
    small_image = _png_data_url(np.zeros((8, 8, 3), "uint8"))
    two_images = [{"type": "image_url", "image_url": {"url": small_image}}] * 2
    return [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", {"max_tokens": 3}, 422),
        ("POST", "/v1/completions", {"prompt": 5}, 422),
        ("POST", "/v1/completions", {"prompt": "a", "temperature": -1}, 422),
        ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 422),
        ("POST", "/v1/completions", {"prompt": "a", "n": 0}, 422),
        ("POST", "/v1/completions", {"prompt": "a", "max_tokens": MAX_TOKENS + 1}, 400),
        ("POST", "/v1/completions", {"prompt": "a", "model": "nope"}, 404),
        ("POST", "/v1/completions", {"prompt": []}, 400),
        ("POST", "/v1/completions", {"prompt": "1 " * MAX_PROMPT_TOKENS}, 400),
        ("POST", "/v1/completions", {"prompt": "x" * (MAX_BODY_BYTES + 1)}, 413),
        ("POST", "/v1/chat/completions", {"messages": []}, 422),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, 422),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": two_images}]}, 400),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big_image}}]}]},
            413,
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
            400,
        ),
        (
            "POST",
            "/v1/embeddings",
            {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]},
            400,
        ),
        ("POST", "/v1/embeddings", {"input": [""]}, 400),
        ("POST", "/v1/embeddings", {"input": []}, 422),
        ("POST", "/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422),
        ("POST", "/api/rewrite", {"texts": "a"}, 422),
        ("GET", "/v1/completions", None, 405),
        ("GET", "/v1/nothing", None, 404),
    ]


def test_bad_requests_are_4xx_and_the_server_stays_ready(ready, http, client, seq_2_seq_lm):
    for method, path, body, status in _bad_requests(ready["url"] + "/health"):
        if isinstance(body, bytes):
            response = http.request(method, path, content=body, headers={"content-type": "application/json"})
        else:
            response = http.request(method, path, json=body)
        assert response.status_code == status, (path, body if not isinstance(body, dict) else list(body), response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.get(ready["url"] + "/health").status_code == 200
    prompt = "reverse: 4 5 6"
    answer = client.completions.create(model=DEMO, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].text == _expected(seq_2_seq_lm, [prompt])[0]


def test_api_key_is_required_except_for_health(ready):
    for path in ("/v1/models", "/metrics", "/api/models"):
        assert httpx.get(ready["url"] + path).status_code == 401
        wrong = httpx.get(ready["url"] + path, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    refused = openai.OpenAI(base_url=ready["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        refused.completions.create(model=DEMO, prompt="sort: 2 1", max_tokens=3)
    assert httpx.get(ready["url"] + "/health").status_code == 200


def test_metrics_and_request_log(ready, http):
    metrics = http.get("/metrics").text
    for name in (
        "t5gemma_requests_total",
        "t5gemma_queue_depth",
        "t5gemma_time_to_first_token_seconds_bucket",
        "t5gemma_generated_tokens_total",
    ):
        assert name in metrics
    assert 'route="/v1/completions",status="200"' in metrics
    lines = [
        json.loads(line) for line in ready["log"].read_text().splitlines() if line.startswith('{"event": "request"')
    ]
    completions = [line for line in lines if line["route"] == "/v1/completions" and line["status"] == 200]
    assert completions and all(line["tokens_out"] is not None and "prompts" not in line for line in completions)
    assert "reverse:" not in ready["log"].read_text()  # no prompt text without --log-prompts


# === ONNX, several models ===


def test_onnx_models_answer_as_keras_and_lru_eviction(client, http, seq_2_seq_lm):
    prompts = _prompts(3, seed=9)
    expected = _expected(seq_2_seq_lm, prompts)
    answer = client.completions.create(model="onnx-a", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    assert [choice.text for choice in sorted(answer.choices, key=lambda choice: choice.index)] == expected
    streamed = client.completions.create(
        model="onnx-a", prompt=prompts[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected[0]
    vectors = [item.embedding for item in client.embeddings.create(model="onnx-a", input=prompts).data]
    keras_vectors = [item.embedding for item in client.embeddings.create(model=DEMO, input=prompts).data]
    np.testing.assert_allclose(vectors, keras_vectors, atol=1e-5)
    assert http.get("/api/models").json()["loaded"] == [DEMO, "onnx-a"]
    # A third model with two loaded: the least recently used (onnx-a, not the demo just used) goes.
    client.completions.create(model=DEMO, prompt=prompts[0], max_tokens=3, temperature=0)
    client.completions.create(model="onnx-b", prompt=prompts[0], max_tokens=3, temperature=0)
    assert http.get("/api/models").json()["loaded"] == [DEMO, "onnx-b"]


def test_sigterm_while_the_model_loads_exits_at_once(tmp_path):
    """A server stopped during its warm-up (compiling every bucketed shape) does not wait for the load."""
    port = _free_port()
    command = [sys.executable, "-m", "keras_t5gemma", "serve", "--preset", DEMO, "--port", str(port)]
    command += ["--max-prompt-tokens", "2048", "--max-tokens", "1024", "--batch-sizes", "1,2,4,8,16"]
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        # 90 shapes to compile: the load is far from done.
        assert health.status_code == 503 and health.json()["status"] == "loading"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# === Last: SIGTERM drains, then the process exits ===


def test_sigterm_drains_in_flight_requests_then_exits(ready, http, seq_2_seq_lm):
    prompts = _prompts(12, seed=10)
    expected = _expected(seq_2_seq_lm, prompts)
    results = {}

    def ask_many():
        body = {"model": DEMO, "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "n": 2}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        results["many"] = httpx.post(ready["url"] + "/v1/completions", json=body, headers=headers, timeout=120)

    body = {"model": DEMO, "prompt": prompts[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        worker = threading.Thread(target=ask_many)
        worker.start()
        # Signal once the 24 rows are queued (the worker takes 16 at a time), so they are in flight.
        deadline = time.monotonic() + 10
        while float(_metric(http.get("/metrics").text, "t5gemma_queue_depth", DEMO)) == 0:
            assert time.monotonic() < deadline and "many" not in results, "the rows never waited in the queue"
            time.sleep(0.005)
        ready["process"].send_signal(signal.SIGTERM)
        rest = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    worker.join()
    assert rest[-1] == "[DONE]"
    pieces = [json.loads(first[len("data: ") :])] + [json.loads(event) for event in rest[:-1]]
    assert "".join(piece["choices"][0]["text"] for piece in pieces) == expected[0]
    assert results["many"].status_code == 200, results["many"].text
    choices = sorted(results["many"].json()["choices"], key=lambda choice: choice["index"])
    assert [choice["text"] for choice in choices] == [answer for answer in expected for _ in range(2)]
    assert ready["process"].wait(timeout=60) == 0
