"""Words and per-word labels to `T5GemmaTokenClassifier` inputs, labels and weights."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_tokenizer import T5GemmaTokenizer
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier_preprocessor import T5Gemma2TokenClassifierPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaTokenClassifierPreprocessor(T5Gemma2TokenClassifierPreprocessor):
    """Prepares words, with one label per word, for `T5GemmaTokenClassifier`.

    `T5Gemma2TokenClassifierPreprocessor` with a `T5GemmaTokenizer`: each
    word tokenized on its own, `<bos>` + the words' tokens right-padded to
    `sequence_length`; a word's label on its first token, which alone has
    `sample_weight` 1.

    Args:
        tokenizer: a `T5GemmaTokenizer`.
        sequence_length: int, padded length.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the words.
    """

    backbone_cls = T5GemmaBackbone
    tokenizer_cls = T5GemmaTokenizer
