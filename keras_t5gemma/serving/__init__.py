"""`keras-t5gemma serve`: an OpenAI-compatible HTTP server for T5Gemma 2 (Keras or ONNX), with batching.

The command line needs one call, `add_serve_parser(subcommands)`; the server's
own dependencies (FastAPI, uvicorn, pydantic, prometheus_client) are the
`serve` extra and are imported only when the command runs.
"""

from keras_t5gemma.serving.command import add_serve_parser
from keras_t5gemma.serving.command import require_serve_extra

__all__ = ["add_serve_parser", "require_serve_extra"]
