"""Converts a Hugging Face T5Gemma 2 checkpoint to a Keras preset folder.

    python tools/checkpoint_conversion/convert_t5gemma2_checkpoints.py \\
        hf://google/t5gemma-2-270m-270m ./t5gemma2_270m_270m --dtype bfloat16 --verify

The same as `keras-t5gemma convert ...` (see `keras-t5gemma convert --help`).
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_t5gemma.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
