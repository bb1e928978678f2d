"""Backbone, tasks, preprocessors, tokenizer and image converter."""

from keras_t5gemma.models.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2_image_converter import T5Gemma2ImageConverter
from keras_t5gemma.models.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.models.t5gemma2_tokenizer import T5Gemma2Tokenizer

__all__ = ["T5Gemma2Backbone", "T5Gemma2ImageConverter", "T5Gemma2Seq2SeqLM", "T5Gemma2Tokenizer"]
