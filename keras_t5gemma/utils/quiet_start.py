"""The command line's environment: JAX when no backend is chosen, TensorFlow's start-up logs hidden.

TensorFlow is imported (by KerasHub's preprocessing) whatever the backend. Its
native libraries log CUDA probing ("Could not find cuda drivers", "failed
call to cuInit") and CPU features while they load, before `absl` logging is
set up, so `TF_CPP_MIN_LOG_LEVEL` does not reach all of them: the command
line loads TensorFlow with the process's stderr pointed at a temporary file,
and prints that file only if loading fails.
"""

import contextlib
import importlib.util
import os
import sys
import tempfile


@contextlib.contextmanager
def native_stderr_held_back():
    """Sends file descriptor 2 to a temporary file; replays it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def configure_command_line():
    """Prefers JAX (when `KERAS_BACKEND` is unset and JAX is installed), then loads TensorFlow quietly."""
    if "KERAS_BACKEND" not in os.environ and importlib.util.find_spec("jax") is not None:
        os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if importlib.util.find_spec("tensorflow") is not None:
        with native_stderr_held_back():
            import tensorflow  # noqa: F401
