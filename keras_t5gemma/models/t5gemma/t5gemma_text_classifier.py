"""T5Gemma (first generation) sequence classification, on the encoder-decoder or on the encoder alone."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_classification import t5gemma_reference_states
from keras_t5gemma.models.t5gemma.t5gemma_text_classifier_preprocessor import T5GemmaTextClassifierPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_text_classifier import T5Gemma2TextClassifier


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaTextClassifier(T5Gemma2TextClassifier):
    """T5Gemma with a classification head: one label per input text.

    Built as `transformers`' `T5GemmaForSequenceClassification`, in the form
    the backbone has (see `t5gemma_classification.py`): on a full
    `T5GemmaBackbone` the decoder reads the input shifted right behind
    `<bos>` and the head reads the decoder state one position after the last
    non-pad input token; on an `encoder_only=True` backbone
    (`is_encoder_decoder=False` in the reference) the head reads the encoder
    state at the last non-pad input token. Hugging Face classification
    checkpoints of either form load with their head, `num_labels` and
    `id2label`; `from_preset(..., encoder_only=True)` of any T5Gemma preset
    builds the encoder-only form (no decoder weights read).

    Args:
        backbone: a `T5GemmaBackbone`, with or without its decoder.
        num_classes, preprocessor, dropout, labels, start_token_id,
        pad_token_id, activation: as for `T5Gemma2TextClassifier`.

    Example (random weights; `from_preset` loads a checkpoint):
    ```python
    backbone = T5GemmaBackbone(
        vocabulary_size=300, encoder_hidden_dim=32, encoder_intermediate_dim=64,
        encoder_num_layers=2, encoder_num_heads=4, encoder_num_key_value_heads=2,
        encoder_head_dim=8, decoder_hidden_dim=16, decoder_intermediate_dim=32,
        decoder_num_layers=2, decoder_num_heads=2, decoder_num_key_value_heads=1,
        decoder_head_dim=8, sliding_window=4, encoder_only=True,
    )
    classifier = T5GemmaTextClassifier(backbone, num_classes=3)
    scores = classifier({
        "encoder_token_ids": np.array([[2, 17, 42, 0]]),
        "encoder_padding_mask": np.array([[1, 1, 1, 0]]),
    })  # (1, 3) logits
    ```
    """

    backbone_cls = T5GemmaBackbone
    preprocessor_cls = T5GemmaTextClassifierPreprocessor
    reference_states = staticmethod(t5gemma_reference_states)
