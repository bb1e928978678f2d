"""T5Gemma 2 for Keras 3."""

import os
import sys


def _started_as_command():
    """Whether this process is `keras-t5gemma` or `python -m keras_t5gemma` (not a library user)."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] == "keras-t5gemma"
    module = getattr(sys, "orig_argv", [])[1:3] == ["-m", "keras_t5gemma"]
    return script or module


if _started_as_command():
    # Before anything imports Keras or TensorFlow: the command line prefers JAX, and answers should not
    # follow TensorFlow's CUDA probing and CPU-feature log lines.
    from keras_t5gemma.utils.quiet_start import configure_command_line

    configure_command_line()

# Registers the Hugging Face checkpoint loaders that `from_preset` dispatches to.
from keras_t5gemma import conversion  # noqa: E402, F401
from keras_t5gemma import models  # noqa: E402
from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder  # noqa: E402
from keras_t5gemma.models import *  # noqa: E402, F401, F403

__all__ = [*models.__all__, "T5Gemma2VisionEncoder"]
