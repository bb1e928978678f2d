"""`keras-t5gemma serve`: the server's flags, and uvicorn run until SIGTERM (or Ctrl-C) has drained the requests.

Example:
```
keras-t5gemma serve --preset t5gemma2_tiny_digits --port 8080
keras-t5gemma serve --preset digits=t5gemma2_tiny_digits --onnx digits-onnx=./digits_onnx --api-key secret
```
"""

import argparse
import logging
import os
import signal
import sys

from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.serving import require_serve_extra
from keras_t5gemma.training.fine_tune import DEFAULT_PRESET

API_KEY_VARIABLE = "KERAS_T5GEMMA_API_KEY"


def _named(text):
    """`NAME=SOURCE` or `SOURCE` (then the name is the source's last path part)."""
    name, separator, source = text.partition("=")
    if not separator:
        source = text
        name = os.path.basename(os.path.normpath(text)) or text
    if not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE or SOURCE; got {text!r}")
    return name, source


def _sizes(text):
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return tuple(sizes)


def add_parser(subcommands):
    """Adds `serve` (every flag, and its handler as `run`) to an argparse subparsers object."""
    serve = subcommands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (completions, chat, embeddings), batched, streaming",
        description="Serves /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models, Termite's "
        "/api/rewrite and /api/models, /health and /metrics. Models load on first use; the first one given "
        'loads at start. Needs `pip install "keras-t5gemma[serve]"`.',
    )
    serve.add_argument(
        "--preset",
        action="append",
        type=_named,
        metavar="[NAME=]PRESET",
        help=f"a Keras model to serve, by name (repeatable; default: {DEFAULT_PRESET})",
    )
    serve.add_argument(
        "--onnx",
        action="append",
        type=_named,
        metavar="[NAME=]FOLDER",
        help="an ONNX export (keras-t5gemma export --format onnx) to serve with t5gemma_onnx (repeatable)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine)")
    serve.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"require `Authorization: Bearer KEY` on every route but /health (default: ${API_KEY_VARIABLE})",
    )
    serve.add_argument("--max-batch-size", type=positive_int, default=16, help="rows per batch (default: 16)")
    serve.add_argument(
        "--batch-sizes",
        type=_sizes,
        help="batch-size buckets, e.g. 1,4,16 (default: powers of 4 up to --max-batch-size, and it)",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="wait for more rows after the first (default: 0: rows that come while a batch decodes join the next)",
    )
    serve.add_argument(
        "--max-queue", type=positive_int, default=256, help="rows that may wait; more get 429 (default: 256)"
    )
    serve.add_argument(
        "--max-prompt-tokens", type=positive_int, default=512, help="longest prompt in tokens (default: 512)"
    )
    serve.add_argument(
        "--max-tokens", type=positive_int, default=256, help="most generated tokens per answer (default: 256)"
    )
    serve.add_argument("--max-images", type=positive_int, default=4, help="images per prompt (default: 4)")
    serve.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=4096 * 4096,
        help="pixels per image, checked before decoding (default: 4096*4096)",
    )
    serve.add_argument(
        "--max-body-bytes", type=positive_int, default=16 * 2**20, help="request body limit (default: 16 MiB)"
    )
    serve.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds per request, queue included (default: 120)"
    )
    serve.add_argument(
        "--keep-alive",
        type=float,
        default=300.0,
        help="unload a model idle this many seconds; 0 or less keeps models loaded (default: 300)",
    )
    serve.add_argument(
        "--max-loaded-models", type=positive_int, default=2, help="least recently used unloads first (default: 2)"
    )
    serve.add_argument(
        "--no-warmup", action="store_true", help="skip compiling every bucketed shape at load (faster start)"
    )
    serve.add_argument("--onnx-threads", type=positive_int, help="onnxruntime intra-op threads (default: its own)")
    precision = "the graph set each --onnx export runs: fp32, fp16, int8, q4 or q4f16 (default: the export's own)"
    serve.add_argument("--onnx-precision", choices=("fp32", "fp16", "int8", "q4", "q4f16"), help=precision)
    serve.add_argument("--log-prompts", action="store_true", help="put prompt text in the request log lines")
    serve.set_defaults(run=run_serve)
    return serve


def _batch_sizes(largest):
    sizes = [1]
    while sizes[-1] * 4 < largest:
        sizes.append(sizes[-1] * 4)
    return tuple(sorted(set(sizes) | {largest}))


def settings_from_args(args):
    from keras_t5gemma.serving.app import ServerSettings
    from keras_t5gemma.serving.registry import ModelSpec

    specs = [ModelSpec(name, "keras", source) for name, source in args.preset or []]
    specs += [ModelSpec(name, "onnx", source) for name, source in args.onnx or []]
    if not specs:
        specs = [ModelSpec(DEFAULT_PRESET, "keras", DEFAULT_PRESET)]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two models are named {', '.join(duplicates)}; name them with NAME=SOURCE")
    batch_sizes = args.batch_sizes or _batch_sizes(args.max_batch_size)
    return ServerSettings(
        models=specs,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_queue=args.max_queue,
        batch_sizes=batch_sizes,
        batch_wait_ms=args.batch_wait_ms,
        request_timeout=args.request_timeout,
        keep_alive=args.keep_alive if args.keep_alive > 0 else None,
        max_loaded_models=args.max_loaded_models,
        warmup=not args.no_warmup,
        log_prompts=args.log_prompts,
        onnx_threads=args.onnx_threads,
        onnx_precision=args.onnx_precision,
    )


def run_serve(args):
    """Serves until SIGTERM or Ctrl-C; requests in flight finish first. Returns 0."""
    require_serve_extra()
    import uvicorn

    from keras_t5gemma.serving.app import create_app
    from keras_t5gemma.serving.registry import load_in_progress

    settings = settings_from_args(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("keras_t5gemma.serving")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=settings.request_timeout,
    )
    # uvicorn re-raises the signal that stopped it once it has drained; with this handler that ends in a return.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    if load_in_progress():
        # Stopped during a load: no finaliser may run beside the compiling thread.
        log.info("stopped while a model was loading")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)
    return 0
