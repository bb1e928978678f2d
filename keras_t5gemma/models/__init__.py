"""Backbone, tasks, preprocessors, tokenizer and image converter."""

from keras_t5gemma.models.t5gemma2_backbone import T5Gemma2Backbone

__all__ = ["T5Gemma2Backbone"]
