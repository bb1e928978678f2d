"""T5Gemma 2 for Keras 3."""

from keras_t5gemma.models.t5gemma2_backbone import T5Gemma2Backbone

__all__ = ["T5Gemma2Backbone"]
