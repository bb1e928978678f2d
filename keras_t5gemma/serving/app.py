"""The FastAPI application: OpenAI's routes, Termite's, health and metrics, around the model registry.

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with
its status: 400 (a bad value), 401 (no or wrong API key), 404 (unknown model
or route), 413 (body or image too large), 422 (a request that does not parse
into its schema), 429 (queue full, with `Retry-After`), 503 (not ready,
unloading, timed out; with `Retry-After`).
"""

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from dataclasses import field

import numpy as np
from fastapi import FastAPI
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.responses import Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import generate_latest

from keras_t5gemma.serving import schemas
from keras_t5gemma.serving.batching import QueueFull
from keras_t5gemma.serving.batching import Row
from keras_t5gemma.serving.batching import SamplingSettings
from keras_t5gemma.serving.batching import ShuttingDown
from keras_t5gemma.serving.engines import PromptError
from keras_t5gemma.serving.metrics import ServerMetrics
from keras_t5gemma.serving.prompts import RequestError
from keras_t5gemma.serving.prompts import embedding_samples
from keras_t5gemma.serving.prompts import render_chat
from keras_t5gemma.serving.registry import ModelRegistry
from keras_t5gemma.serving.registry import UnknownModel

log = logging.getLogger("keras_t5gemma.serving")
ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/chat/completions",
    "/api/rewrite",
    "/api/models",
)
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}


@dataclass
class ServerSettings:
    """Everything `keras-t5gemma serve` sets (see `commands/serve.py` for each)."""

    models: list
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    max_prompt_tokens: int = 512
    max_tokens: int = 256
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    max_queue: int = 256
    batch_sizes: tuple = (1, 4, 16)
    batch_wait_ms: float = 0.0
    request_timeout: float = 120.0
    keep_alive: float | None = 300.0
    max_loaded_models: int = 2
    warmup: bool = True
    log_prompts: bool = False
    onnx_threads: int | None = None
    onnx_precision: str | None = None
    started: float = field(default_factory=time.time)


def error_response(status, message, param=None, code=None, headers=None):
    error_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = schemas.ErrorResponse(error=schemas.ErrorDetail(message=message, type=error_type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: request id, API key, body-size limit, one JSON log line and the request metrics."""

    def __init__(self, app, settings, metrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex[:16]
        status = {"code": 500, "sent": False}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", state["request_id"].encode()))
            await send(message)

        response = self._refusal(scope, path)
        if response is not None:
            await response(scope, receive, send_and_record)
        else:
            received = {"bytes": 0}
            limit = self.settings.max_body_bytes

            async def counted_receive():
                message = await receive()
                if message["type"] == "http.request":
                    received["bytes"] += len(message.get("body", b""))
                    if received["bytes"] > limit:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, counted_receive, send_and_record)
            except _BodyTooLarge:
                if not status["sent"]:
                    await _too_large(limit)(scope, receive, send_and_record)
        seconds = time.monotonic() - started
        self.metrics.requests.labels(route, str(status["code"])).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        line = {
            "event": "request",
            "id": state["request_id"],
            "method": scope["method"],
            "route": route,
            "status": status["code"],
            "model": state.get("model"),
            "tokens_in": state.get("tokens_in"),
            "tokens_out": state.get("tokens_out"),
            "latency_ms": round(seconds * 1000, 2),
        }
        if self.settings.log_prompts and "prompts" in state:
            line["prompts"] = state["prompts"]
        log.info(json.dumps(line))

    def _refusal(self, scope, path):
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key and path != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                message = "a valid API key is needed: Authorization: Bearer KEY"
                return error_response(401, message, code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "Content-Length is not a number")
            if int(length) > self.settings.max_body_bytes:
                return _too_large(self.settings.max_body_bytes)
        return None


def _too_large(limit):
    return error_response(413, f"the request body is over {limit} bytes", code="request_too_large")


def create_app(settings):
    """The server's ASGI app. Loads the first model in the background; `/health` says when it is ready."""
    metrics = ServerMetrics()
    registry = ModelRegistry(settings.models, settings, metrics)
    status = {"health": "loading"}

    async def load_default():
        try:
            registry.release(await registry.get(None))
            status["health"] = "ready"
        except Exception as error:  # reported by /health and the log; the process stays up to say so
            status["health"] = "failed"
            log.error(json.dumps({"event": "load_failed", "model": registry.default, "error": str(error)}))

    async def unload_idle_models():
        period = 1.0 if settings.keep_alive is None else max(0.05, min(1.0, settings.keep_alive / 4))
        while True:
            await asyncio.sleep(period)
            await registry.unload_idle()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(load_default()), asyncio.create_task(unload_idle_models())]
        yield
        for task in tasks:
            task.cancel()
        await registry.close()

    app = FastAPI(title="keras-t5gemma", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.metrics = metrics
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)

    # === Errors ===

    @app.exception_handler(RequestError)
    async def request_error(request, error):
        return error_response(error.status, str(error), error.param, error.code)

    @app.exception_handler(PromptError)
    async def prompt_error(request, error):
        return error_response(400, str(error), "prompt", "invalid_prompt")

    @app.exception_handler(UnknownModel)
    async def unknown_model(request, error):
        names = ", ".join(registry.specs)
        return error_response(404, f"no model {error.args[0]!r}; this server has: {names}", "model", "model_not_found")

    @app.exception_handler(QueueFull)
    async def queue_full(request, error):
        return error_response(429, str(error), code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request, error):
        return error_response(503, str(error), code="unavailable", headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        errors = error.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid" or not param:
            return error_response(400, f"the body is not a valid JSON request: {first.get('msg')}", code="invalid_json")
        return error_response(422, f"{param}: {first.get('msg')}", param, "invalid_value")

    @app.exception_handler(404)
    @app.exception_handler(405)
    async def http_error(request, error):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, error):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(error).__name__}")

    # === Generation ===

    def ready_or_503():
        if status["health"] != "ready":
            raise RequestError("the server is still loading its model", status=503, code="loading")

    def check_images(model, prompts):
        if sum(len(images) for _, images in prompts) and not model.engine.vision:
            raise RequestError("this model has no vision tower; it cannot take images")
        for _, images in prompts:
            if len(images) > settings.max_images:
                raise RequestError(f"{len(images)} images in one prompt; the limit is {settings.max_images}")

    async def prepare_prompts(model, prompts):
        check_images(model, prompts)
        return [
            await asyncio.to_thread(model.engine.prepare, text, images, model.max_prompt_tokens)
            for text, images in prompts
        ]

    def sampling_settings(body, index):
        seed = None if body.seed is None else body.seed + index
        return SamplingSettings(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed)

    async def start_rows(request, body, prompts, max_tokens):
        """Loads the model, lays out the prompts and queues one row per prompt and choice."""
        model = await registry.get(body.model)
        try:
            request.state.model = model.spec.name
            if settings.log_prompts:
                request.state.prompts = [text for text, _ in prompts]
            max_tokens = max_tokens or model.max_tokens
            if max_tokens > model.max_tokens:
                raise RequestError(
                    f"max_tokens {max_tokens} is over this model's limit of {model.max_tokens}", param="max_tokens"
                )
            prepared = await prepare_prompts(model, prompts)
            request.state.tokens_in = sum(len(prompt.token_ids) for prompt in prepared)
            stop = tuple(s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s)
            loop = asyncio.get_running_loop()
            events = asyncio.Queue()
            deadline = time.monotonic() + settings.request_timeout
            rows = []
            for prompt in prepared:
                for _ in range(body.n):
                    index = len(rows)

                    def emit(event, index=index):
                        loop.call_soon_threadsafe(events.put_nowait, (index, event))

                    sampling = sampling_settings(body, index % body.n)
                    rows.append(Row(prompt, max_tokens, sampling, stop, emit, deadline))
            if len(rows) > settings.max_queue:
                raise RequestError(f"{len(rows)} sequences in one request; the queue holds {settings.max_queue}")
            model.batcher.submit(rows)
        except BaseException:
            registry.release(model)
            raise
        return model, rows, events

    async def collect(request, model, rows, events):
        """Every row's text and finish reason; stops the rows if the client leaves."""
        texts = [""] * len(rows)
        reasons = [None] * len(rows)
        tokens = [0] * len(rows)
        try:
            waiting = len(rows)
            while waiting:
                try:
                    index, event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise RequestError("the client left", status=499)
                    continue
                if event[0] == "delta":
                    texts[index] += event[1]
                elif event[0] == "done":
                    reasons[index], tokens[index] = event[1], event[2]
                    waiting -= 1
                else:
                    raise RequestError(event[2], status=event[1], code="generation_failed")
        finally:
            for row in rows:
                row.cancelled.set()
            registry.release(model)
        request.state.tokens_out = sum(tokens)
        return texts, reasons, tokens

    def usage(request, completion_tokens):
        prompt_tokens = request.state.tokens_in
        return schemas.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    def stream(request, model, rows, events, make_chunk, first_chunks=()):
        """Server-sent events: OpenAI chunks as pieces come, then `data: [DONE]`."""
        released = {"done": False}

        def release():
            if not released["done"]:
                released["done"] = True
                for row in rows:
                    row.cancelled.set()
                registry.release(model)

        include_usage = bool((getattr(request.state, "stream_options", None) or {}).get("include_usage"))

        async def events_stream():
            completion_tokens = 0
            try:
                for chunk in first_chunks:
                    yield f"data: {chunk}\n\n"
                waiting = len(rows)
                while waiting:
                    index, event = await events.get()
                    if event[0] == "delta":
                        yield f"data: {make_chunk(index, event[1], None)}\n\n"
                    elif event[0] == "done":
                        waiting -= 1
                        completion_tokens += event[2]
                        yield f"data: {make_chunk(index, None, event[1])}\n\n"
                    else:
                        error = schemas.ErrorDetail(message=event[2], type="server_error", code="generation_failed")
                        yield f"data: {json.dumps({'error': error.model_dump()})}\n\n"
                        break
                request.state.tokens_out = completion_tokens
                if include_usage:
                    yield f"data: {make_chunk(None, None, None, usage(request, completion_tokens))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                release()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events_stream(), media_type="text/event-stream", headers=headers)

    def remember_stream_options(request, body):
        request.state.stream_options = (body.model_extra or {}).get("stream_options")

    @app.post("/v1/completions", response_model=schemas.CompletionResponse)
    async def completions(request: Request, body: schemas.CompletionRequest):
        ready_or_503()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError("prompt is an empty list", param="prompt")
        model, rows, events = await start_rows(request, body, [(text, []) for text in prompts], body.max_tokens)
        response_id, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model.spec.name
        if body.stream:
            remember_stream_options(request, body)

            def make_chunk(index, text, reason, usage=None):
                choices = [] if index is None else [{"index": index, "text": text or "", "logprobs": None}]
                if choices:
                    choices[0]["finish_reason"] = reason
                chunk = {"id": response_id, "object": "text_completion", "created": created, "model": name}
                chunk["choices"] = choices
                if usage is not None:
                    chunk["usage"] = usage.model_dump()
                return json.dumps(chunk)

            return stream(request, model, rows, events, make_chunk)
        texts, reasons, tokens = await collect(request, model, rows, events)
        choices = [
            schemas.CompletionChoice(index=index, text=text, finish_reason=reason)
            for index, (text, reason) in enumerate(zip(texts, reasons))
        ]
        return schemas.CompletionResponse(
            id=response_id, created=created, model=name, choices=choices, usage=usage(request, sum(tokens))
        )

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse)
    async def chat_completions(request: Request, body: schemas.ChatCompletionRequest):
        ready_or_503()
        prompt = render_chat(body.messages, settings.max_image_pixels)
        max_tokens = body.max_completion_tokens or body.max_tokens
        model, rows, events = await start_rows(request, body, [prompt], max_tokens)
        response_id, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model.spec.name
        if body.stream:
            remember_stream_options(request, body)

            def make_chunk(index, text, reason, usage=None):
                choices = []
                if index is not None:
                    delta = schemas.ChatDelta(content=text) if text is not None else schemas.ChatDelta()
                    choices = [schemas.ChatChunkChoice(index=index, delta=delta, finish_reason=reason)]
                chunk = schemas.ChatCompletionChunk(id=response_id, created=created, model=name, choices=choices)
                data = chunk.model_dump(exclude_none=True)
                for choice in data["choices"]:
                    choice["finish_reason"] = reason
                    choice["logprobs"] = None
                if usage is not None:
                    data["usage"] = usage.model_dump()
                return json.dumps(data)

            first = []
            for index in range(len(rows)):
                role = schemas.ChatChunkChoice(index=index, delta=schemas.ChatDelta(role="assistant", content=""))
                chunk = schemas.ChatCompletionChunk(id=response_id, created=created, model=name, choices=[role])
                first.append(chunk.model_dump_json())
            return stream(request, model, rows, events, make_chunk, first)
        texts, reasons, tokens = await collect(request, model, rows, events)
        choices = [
            schemas.ChatChoice(index=index, message=schemas.AssistantMessage(content=text), finish_reason=reason)
            for index, (text, reason) in enumerate(zip(texts, reasons))
        ]
        return schemas.ChatCompletionResponse(
            id=response_id, created=created, model=name, choices=choices, usage=usage(request, sum(tokens))
        )

    @app.post("/api/rewrite", response_model=schemas.RewriteResponse)
    async def rewrite(request: Request, body: schemas.RewriteRequest):
        ready_or_503()
        greedy = schemas.CompletionRequest(prompt=body.texts, model=body.model, temperature=0.0)
        model, rows, events = await start_rows(request, greedy, [(text, []) for text in body.texts], body.max_tokens)
        texts, _, tokens = await collect(request, model, rows, events)
        outputs = [schemas.RewriteOutput(text=text, tokens=count) for text, count in zip(texts, tokens)]
        return schemas.RewriteResponse(model=model.spec.name, outputs=outputs)

    # === Embeddings ===

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingResponse)
    async def embeddings(request: Request, body: schemas.EmbeddingRequest):
        ready_or_503()
        samples = embedding_samples(body.input, settings.max_image_pixels)
        model = await registry.get(body.model)
        try:
            request.state.model = model.spec.name
            limit = min(model.max_prompt_tokens, model.engine.embed_max_prompt_tokens)
            check_images(model, samples)
            # Image-only samples skip the prompt layout: their vector is the mean of their images' tokens.
            with_text = [(text, images) for text, images in samples if text is not None]
            prepared = iter(await prepare_prompts(model, with_text))
            counts = [
                len(next(prepared).token_ids) if text is not None else len(images) * model.engine.tokens_per_image
                for text, images in samples
            ]
            for index, count in enumerate(counts):
                if count > limit:
                    raise RequestError(
                        f"input[{index}] has {count} tokens; embeddings take at most {limit}", param=f"input[{index}]"
                    )
            vectors = await asyncio.to_thread(model.engine.embed, samples)
        finally:
            registry.release(model)
        request.state.tokens_in = sum(counts)
        data = []
        for index, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
            else:
                value = [float(x) for x in vector]
            data.append(schemas.Embedding(index=index, embedding=value))
        tokens = sum(counts)
        return schemas.EmbeddingResponse(
            data=data,
            model=model.spec.name,
            usage=schemas.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    # === Models, health, metrics ===

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def models():
        created = int(settings.started)
        return schemas.ModelList(data=[schemas.ModelCard(id=name, created=created) for name in registry.specs])

    @app.get("/api/models", response_model=schemas.TermiteModels)
    async def termite_models():
        names = list(registry.specs)
        return schemas.TermiteModels(embedders=names, rewriters=names, generators=names, loaded=list(registry.loaded))

    @app.get("/health", response_model=schemas.Health)
    async def health():
        body = schemas.Health(status=status["health"], models=list(registry.loaded))
        return JSONResponse(body.model_dump(), status_code=200 if status["health"] == "ready" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
