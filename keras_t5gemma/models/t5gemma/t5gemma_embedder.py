"""T5Gemma (first generation) embeddings: the encoder alone, pooled to one vector per input."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_embedder_preprocessor import T5GemmaEmbedderPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaEmbedder(T5Gemma2Embedder):
    """T5Gemma encoder embeddings: one `(encoder_hidden_dim,)` vector per text.

    `T5Gemma2Embedder` over a `T5GemmaBackbone`: the bidirectional encoder
    runs over `<bos>` + text and its outputs are pooled (`"mean"` over the
    real tokens, `"first"` or `"last"`), L2-normalised with `normalize`.
    Text only. `from_preset` builds an encoder-only backbone (no decoder
    weights read).

    Args:
        backbone: a `T5GemmaBackbone`, preferably with `encoder_only=True`.
        preprocessor: a `T5GemmaEmbedderPreprocessor`, or `None` (then inputs
            are `encoder_token_ids` / `encoder_padding_mask` dicts).
        pooling: `"mean"`, `"first"` or `"last"`.
        normalize: bool, L2-normalise the vectors.

    Example (random weights; `T5GemmaEmbedder.from_preset("t5gemma_b_b_ul2")`
    loads a released encoder):
    ```python
    backbone = T5GemmaBackbone(
        vocabulary_size=300, encoder_hidden_dim=32, encoder_intermediate_dim=64,
        encoder_num_layers=2, encoder_num_heads=4, encoder_num_key_value_heads=2,
        encoder_head_dim=8, decoder_hidden_dim=16, decoder_intermediate_dim=32,
        decoder_num_layers=2, decoder_num_heads=2, decoder_num_key_value_heads=1,
        decoder_head_dim=8, sliding_window=4, encoder_only=True,
    )
    embedder = T5GemmaEmbedder(backbone)
    vectors = embedder.predict({
        "encoder_token_ids": np.array([[2, 17, 42, 9]]),
        "encoder_padding_mask": np.ones((1, 4), "int32"),
    })  # (1, 32)
    ```
    """

    backbone_cls = T5GemmaBackbone
    preprocessor_cls = T5GemmaEmbedderPreprocessor
