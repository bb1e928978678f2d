"""Backbone, tasks, preprocessors, tokenizer and image converter."""

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_embedder import T5GemmaEmbedder
from keras_t5gemma.models.t5gemma.t5gemma_embedder_preprocessor import T5GemmaEmbedderPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_presets import backbone_presets as t5gemma_backbone_presets
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm_preprocessor import T5GemmaSeq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_text_classifier import T5GemmaTextClassifier
from keras_t5gemma.models.t5gemma.t5gemma_text_classifier_preprocessor import T5GemmaTextClassifierPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_token_classifier import T5GemmaTokenClassifier
from keras_t5gemma.models.t5gemma.t5gemma_token_classifier_preprocessor import T5GemmaTokenClassifierPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_tokenizer import T5GemmaTokenizer
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder_preprocessor import T5Gemma2EmbedderPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import T5Gemma2ImageConverter
from keras_t5gemma.models.t5gemma2.t5gemma2_presets import backbone_presets
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_text_classifier import T5Gemma2TextClassifier
from keras_t5gemma.models.t5gemma2.t5gemma2_text_classifier_preprocessor import T5Gemma2TextClassifierPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier import T5Gemma2TokenClassifier
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier_preprocessor import T5Gemma2TokenClassifierPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import T5Gemma2Tokenizer
from keras_t5gemma.utils.preset_utils import register_presets

__all__ = [
    "T5Gemma2Backbone",
    "T5Gemma2Embedder",
    "T5Gemma2EmbedderPreprocessor",
    "T5Gemma2ImageConverter",
    "T5Gemma2Seq2SeqLM",
    "T5Gemma2Seq2SeqLMPreprocessor",
    "T5Gemma2TextClassifier",
    "T5Gemma2TextClassifierPreprocessor",
    "T5Gemma2TokenClassifier",
    "T5Gemma2TokenClassifierPreprocessor",
    "T5Gemma2Tokenizer",
    "T5GemmaBackbone",
    "T5GemmaEmbedder",
    "T5GemmaEmbedderPreprocessor",
    "T5GemmaSeq2SeqLM",
    "T5GemmaSeq2SeqLMPreprocessor",
    "T5GemmaTextClassifier",
    "T5GemmaTextClassifierPreprocessor",
    "T5GemmaTokenClassifier",
    "T5GemmaTokenClassifierPreprocessor",
    "T5GemmaTokenizer",
]

register_presets(
    backbone_presets,
    [
        T5Gemma2Backbone,
        T5Gemma2Embedder,
        T5Gemma2EmbedderPreprocessor,
        T5Gemma2ImageConverter,
        T5Gemma2Seq2SeqLM,
        T5Gemma2Seq2SeqLMPreprocessor,
        T5Gemma2TextClassifier,
        T5Gemma2TextClassifierPreprocessor,
        T5Gemma2TokenClassifier,
        T5Gemma2TokenClassifierPreprocessor,
        T5Gemma2Tokenizer,
    ],
)

register_presets(
    t5gemma_backbone_presets,
    [
        T5GemmaBackbone,
        T5GemmaEmbedder,
        T5GemmaEmbedderPreprocessor,
        T5GemmaSeq2SeqLM,
        T5GemmaSeq2SeqLMPreprocessor,
        T5GemmaTextClassifier,
        T5GemmaTextClassifierPreprocessor,
        T5GemmaTokenClassifier,
        T5GemmaTokenClassifierPreprocessor,
        T5GemmaTokenizer,
    ],
)
