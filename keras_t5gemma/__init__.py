"""T5Gemma 2 for Keras 3."""

# Registers the Hugging Face checkpoint loaders that `from_preset` dispatches to.
from keras_t5gemma import conversion  # noqa: F401
from keras_t5gemma import models
from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
from keras_t5gemma.models import *  # noqa: F401,F403

__all__ = [*models.__all__, "T5Gemma2VisionEncoder"]
