"""T5Gemma (first generation) token classification, on the encoder-decoder or on the encoder alone."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_classification import t5gemma_reference_states
from keras_t5gemma.models.t5gemma.t5gemma_token_classifier_preprocessor import T5GemmaTokenClassifierPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier import T5Gemma2TokenClassifier


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaTokenClassifier(T5Gemma2TokenClassifier):
    """T5Gemma with a classification head on every input token.

    Built as `transformers`' `T5GemmaForTokenClassification`, in the form the
    backbone has: on a full `T5GemmaBackbone` the head reads the decoder
    states (the decoder reads the input shifted right behind `<bos>`, padding
    masked); on an `encoder_only=True` backbone it reads the encoder states.
    `fit`, `evaluate`, `predict` and `predict_words` work as for
    `T5Gemma2TokenClassifier`.

    Args:
        backbone: a `T5GemmaBackbone`, with or without its decoder.
        num_classes, preprocessor, dropout, labels, start_token_id,
        pad_token_id, activation: as for `T5Gemma2TokenClassifier`.

    Example (random weights; `from_preset` loads a checkpoint):
    ```python
    backbone = T5GemmaBackbone(
        vocabulary_size=300, encoder_hidden_dim=32, encoder_intermediate_dim=64,
        encoder_num_layers=2, encoder_num_heads=4, encoder_num_key_value_heads=2,
        encoder_head_dim=8, decoder_hidden_dim=16, decoder_intermediate_dim=32,
        decoder_num_layers=2, decoder_num_heads=2, decoder_num_key_value_heads=1,
        decoder_head_dim=8, sliding_window=4,
    )
    tagger = T5GemmaTokenClassifier(backbone, num_classes=2)
    scores = tagger({
        "encoder_token_ids": np.array([[2, 17, 42, 0]]),
        "encoder_padding_mask": np.array([[1, 1, 1, 0]]),
    })  # (1, 4, 2) logits
    ```
    """

    backbone_cls = T5GemmaBackbone
    preprocessor_cls = T5GemmaTokenClassifierPreprocessor
    reference_states = staticmethod(t5gemma_reference_states)
