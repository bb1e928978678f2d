"""T5Gemma (first generation) sequence-to-sequence language model."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm_preprocessor import T5GemmaSeq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaSeq2SeqLM(T5Gemma2Seq2SeqLM):
    """T5Gemma with a language-modelling head, for generation and fine-tuning.

    The task of `T5Gemma2Seq2SeqLM` over a `T5GemmaBackbone`: `generate` runs
    the encoder and computes every decoder layer's cross-attention keys and
    values once per call, then samples one token per step with a
    self-attention cache; the logits are the decoder table's projection,
    soft-capped. `fit`, `enable_lora`, `quantize` and `save_to_preset` work
    as for T5Gemma 2.

    Args:
        backbone: a `T5GemmaBackbone`.
        preprocessor: a `T5GemmaSeq2SeqLMPreprocessor` or `None`.

    Example (random weights; `T5GemmaSeq2SeqLM.from_preset("t5gemma_2b_2b_prefixlm_it")`
    loads a released checkpoint):
    ```python
    backbone = T5GemmaBackbone(
        vocabulary_size=300, encoder_hidden_dim=32, encoder_intermediate_dim=64,
        encoder_num_layers=2, encoder_num_heads=4, encoder_num_key_value_heads=2,
        encoder_head_dim=8, decoder_hidden_dim=16, decoder_intermediate_dim=32,
        decoder_num_layers=2, decoder_num_heads=2, decoder_num_key_value_heads=1,
        decoder_head_dim=8, sliding_window=4,
    )
    seq_2_seq_lm = T5GemmaSeq2SeqLM(backbone)
    seq_2_seq_lm.compile(sampler="greedy")
    output = seq_2_seq_lm.generate({
        "encoder_token_ids": np.array([[2, 17, 42, 9]]),
        "encoder_padding_mask": np.ones((1, 4), "int32"),
        "decoder_token_ids": np.array([[2, 0, 0, 0, 0, 0]]),
        "decoder_padding_mask": np.array([[1, 0, 0, 0, 0, 0]]),
    }, stop_token_ids=None)
    output["decoder_token_ids"].shape  # (1, 6)
    ```
    """

    backbone_cls = T5GemmaBackbone
    preprocessor_cls = T5GemmaSeq2SeqLMPreprocessor
    # The released T5Gemma configs' `max_position_embeddings`.
    max_decoder_positions = 8192
