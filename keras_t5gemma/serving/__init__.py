"""`keras-t5gemma serve`: an OpenAI-compatible HTTP server for T5Gemma 2 (Keras or ONNX), with batching.

The command (`keras_t5gemma/commands/serve.py`) builds a `ServerSettings` and
runs `app.create_app(settings)` under uvicorn. The server's own dependencies
(FastAPI, uvicorn, pydantic, prometheus_client) are the `serve` extra and are
imported only when the command runs.
"""

import importlib.util

SERVE_EXTRA = ("fastapi", "uvicorn", "pydantic", "prometheus_client")


def require_serve_extra():
    """Raises `ImportError` naming the missing packages and the extra that installs them."""
    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f'`keras-t5gemma serve` needs {", ".join(missing)}: install them with `pip install "keras-t5gemma[serve]"`.'
        )
