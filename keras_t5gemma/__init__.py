"""T5Gemma 2 for Keras 3."""

from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
from keras_t5gemma.models import ContrastivePairModel
from keras_t5gemma.models import T5Gemma2Backbone
from keras_t5gemma.models import T5Gemma2Embedder
from keras_t5gemma.models import T5Gemma2EmbedderPreprocessor
from keras_t5gemma.models import T5Gemma2ImageConverter
from keras_t5gemma.models import T5Gemma2Seq2SeqLM
from keras_t5gemma.models import T5Gemma2Seq2SeqLMPreprocessor
from keras_t5gemma.models import T5Gemma2Tokenizer

__all__ = [
    "ContrastivePairModel",
    "T5Gemma2Backbone",
    "T5Gemma2Embedder",
    "T5Gemma2EmbedderPreprocessor",
    "T5Gemma2ImageConverter",
    "T5Gemma2Seq2SeqLM",
    "T5Gemma2Seq2SeqLMPreprocessor",
    "T5Gemma2Tokenizer",
    "T5Gemma2VisionEncoder",
]
