"""T5Gemma (first generation) backbone: a Gemma 2 encoder and decoder, text only."""

import keras

from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.token_embedding import TokenEmbedding
from keras_t5gemma.layers.transformer import TransformerStack
from keras_t5gemma.models.encoder_decoder_backbone import EncoderDecoderBackbone
from keras_t5gemma.models.encoder_decoder_backbone import check_attention_sizes
from keras_t5gemma.models.encoder_decoder_backbone import check_layer_types
from keras_t5gemma.models.encoder_decoder_backbone import check_positive_int
from keras_t5gemma.models.encoder_decoder_backbone import check_regularisation
from keras_t5gemma.models.encoder_decoder_backbone import layer_arguments


def alternating_layer_types(num_layers):
    """Gemma 2's pattern: sliding and full attention alternate, sliding first."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaBackbone(EncoderDecoderBackbone):
    """T5Gemma encoder-decoder backbone (the first generation, adapted from Gemma 2).

    A bidirectional Gemma 2 encoder and a causal Gemma 2 decoder whose layers
    attend to the encoder in a separate cross-attention block. Encoder and
    decoder may differ in width, depth and heads (9b-2b): the cross-attention
    keys and values project from the encoder width. The encoder has its own
    embedding table (`encoder_token_embedding`); the decoder's
    (`token_embedding`) is tied to the output projection
    (`token_embedding.logits`), which soft-caps the logits.

    Differences from `T5Gemma2Backbone`: Gemma 2 layers (no query/key norm,
    attention-logit soft-capping, sliding and full layers alternating, one
    RoPE base), the encoder's sliding window covers `sliding_window` keys on
    each side of a query (`|i - j| <= sliding_window`), no vision tower and no
    end-of-image vector.

    Inputs:
        encoder_token_ids, encoder_padding_mask: int `(B, S)`.
        decoder_token_ids, decoder_padding_mask: int `(B, T)`.

    Outputs (dict):
        encoder_sequence_output: `(B, S, encoder_hidden_dim)`.
        decoder_sequence_output: `(B, T, decoder_hidden_dim)`, after the final norm.

    Args:
        vocabulary_size: int.
        encoder_hidden_dim, encoder_intermediate_dim, encoder_num_layers,
        encoder_num_heads, encoder_num_key_value_heads, encoder_head_dim: the
            encoder's sizes.
        decoder_*: the same for the decoder.
        encoder_layer_types, decoder_layer_types: optional lists of
            `"sliding_attention"` / `"full_attention"`; default alternating,
            sliding first.
        sliding_window: int, as stored in the reference config (4096).
        query_pre_attn_scalar: float, logits are scaled by its inverse square root.
        rope_wavelength: float, the RoPE base of every layer.
        layer_norm_epsilon: float.
        attention_logit_soft_cap, final_logit_soft_cap: optional floats (50
            and 30 in the releases).
        dropout: float, on embeddings, block outputs, MLP activations and the
            stack outputs.
        attention_dropout: float, on attention probabilities.
        encoder_only: bool, build no decoder (for embeddings).
        remat: bool, recompute each transformer layer in the backward pass
            (see `T5Gemma2Backbone`).
        dtype: dtype policy.

    Example:
    ```python
    backbone = T5GemmaBackbone(
        vocabulary_size=300, encoder_hidden_dim=32, encoder_intermediate_dim=64,
        encoder_num_layers=2, encoder_num_heads=4, encoder_num_key_value_heads=2,
        encoder_head_dim=8, decoder_hidden_dim=16, decoder_intermediate_dim=32,
        decoder_num_layers=2, decoder_num_heads=2, decoder_num_key_value_heads=1,
        decoder_head_dim=8, sliding_window=4,
    )
    outputs = backbone({
        "encoder_token_ids": np.ones((1, 6), "int32"),
        "encoder_padding_mask": np.ones((1, 6), "int32"),
        "decoder_token_ids": np.ones((1, 3), "int32"),
        "decoder_padding_mask": np.ones((1, 3), "int32"),
    })
    logits = backbone.token_embedding.logits(outputs["decoder_sequence_output"])
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        encoder_hidden_dim,
        encoder_intermediate_dim,
        encoder_num_layers,
        encoder_num_heads,
        encoder_num_key_value_heads,
        encoder_head_dim,
        decoder_hidden_dim,
        decoder_intermediate_dim,
        decoder_num_layers,
        decoder_num_heads,
        decoder_num_key_value_heads,
        decoder_head_dim,
        encoder_layer_types=None,
        decoder_layer_types=None,
        sliding_window=4096,
        query_pre_attn_scalar=256,
        rope_wavelength=10_000.0,
        layer_norm_epsilon=1e-6,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        dropout=0.0,
        attention_dropout=0.0,
        encoder_only=False,
        remat=False,
        dtype=None,
        **kwargs,
    ):
        sides = {
            "encoder": (
                encoder_hidden_dim,
                encoder_intermediate_dim,
                encoder_num_layers,
                encoder_num_heads,
                encoder_num_key_value_heads,
                encoder_head_dim,
            ),
            "decoder": (
                decoder_hidden_dim,
                decoder_intermediate_dim,
                decoder_num_layers,
                decoder_num_heads,
                decoder_num_key_value_heads,
                decoder_head_dim,
            ),
        }
        check_positive_int("vocabulary_size", vocabulary_size)
        check_positive_int("sliding_window", sliding_window)
        names = ("hidden_dim", "intermediate_dim", "num_layers", "num_heads", "num_key_value_heads", "head_dim")
        for side, sizes in sides.items():
            for name, value in zip(names, sizes):
                check_positive_int(f"{side}_{name}", value)
            check_attention_sizes(f"{side}_", *sizes[3:])
        check_regularisation(dropout, attention_dropout, attention_logit_soft_cap, final_logit_soft_cap)
        encoder_layer_types = list(encoder_layer_types or alternating_layer_types(encoder_num_layers))
        decoder_layer_types = list(decoder_layer_types or alternating_layer_types(decoder_num_layers))
        check_layer_types("encoder_layer_types", encoder_layer_types, encoder_num_layers)
        check_layer_types("decoder_layer_types", decoder_layer_types, decoder_num_layers)

        # === Layers ===
        def embedding(hidden_dim, logit_soft_cap, name):
            return TokenEmbedding(
                vocabulary_size, hidden_dim, eoi_token_id=None, logit_soft_cap=logit_soft_cap, dtype=dtype, name=name
            )

        def stack(side, layer_types, causal, window):
            _, intermediate_dim, _, num_heads, num_key_value_heads, head_dim = sides[side]
            # Gemma 2 layers: no query/key norm. The decoder attends to the
            # encoder in blocks of its own, projecting from the encoder width.
            layer_kwargs = layer_arguments(
                intermediate_dim,
                num_heads,
                num_key_value_heads,
                head_dim,
                query_pre_attn_scalar,
                layer_norm_epsilon,
                attention_logit_soft_cap,
                attention_dropout,
                use_query_key_norm=False,
                cross_attention_dim=encoder_hidden_dim if causal else None,
            )
            return TransformerStack(
                layer_types,
                causal=causal,
                sliding_window=window,
                rope={SLIDING: (rope_wavelength, 1.0), FULL: (rope_wavelength, 1.0)},
                layer_kwargs=layer_kwargs,
                dropout=dropout,
                remat=remat,
                dtype=dtype,
                name=side,
            )

        self.encoder_token_embedding = embedding(encoder_hidden_dim, None, "encoder_token_embedding")
        # The reference encoder lets query i see key j when |i - j| <= w: the
        # bidirectional split (`masks.window_reach`) of a window of 2w + 1.
        self.encoder = stack("encoder", encoder_layer_types, causal=False, window=2 * sliding_window + 1)
        # Text only; the tasks shared with T5Gemma 2 look for a vision tower here.
        self.vision_encoder = None
        self.token_embedding = None
        self.decoder = None
        if not encoder_only:
            self.token_embedding = embedding(decoder_hidden_dim, final_logit_soft_cap, "token_embedding")
            self.decoder = stack("decoder", decoder_layer_types, causal=True, window=sliding_window)

        # === Functional model ===
        self._build_functional_model(encoder_only, dtype=dtype, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.encoder_hidden_dim = encoder_hidden_dim
        self.encoder_intermediate_dim = encoder_intermediate_dim
        self.encoder_num_layers = encoder_num_layers
        self.encoder_num_heads = encoder_num_heads
        self.encoder_num_key_value_heads = encoder_num_key_value_heads
        self.encoder_head_dim = encoder_head_dim
        self.decoder_hidden_dim = decoder_hidden_dim
        self.decoder_intermediate_dim = decoder_intermediate_dim
        self.decoder_num_layers = decoder_num_layers
        self.decoder_num_heads = decoder_num_heads
        self.decoder_num_key_value_heads = decoder_num_key_value_heads
        self.decoder_head_dim = decoder_head_dim
        self.encoder_layer_types = encoder_layer_types
        self.decoder_layer_types = decoder_layer_types
        self.sliding_window = sliding_window
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.rope_wavelength = rope_wavelength
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.encoder_only = encoder_only
        self.remat = remat

    def encode(self, token_ids, padding_mask, images=None, training=False):
        """Encoder output `(B, S, encoder_hidden_dim)`. Text only: `images` must be None."""
        if images is not None:
            raise ValueError("T5Gemma is a text-only model; it takes no images.")
        return self.encoder(self.encoder_token_embedding(token_ids), padding_mask, training=training)

    def _check_inputs(self, inputs):
        if "images" in inputs:
            raise ValueError("T5Gemma is a text-only model; it takes no `images`.")
        return super()._check_inputs(inputs)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "encoder_hidden_dim": self.encoder_hidden_dim,
            "encoder_intermediate_dim": self.encoder_intermediate_dim,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_num_heads": self.encoder_num_heads,
            "encoder_num_key_value_heads": self.encoder_num_key_value_heads,
            "encoder_head_dim": self.encoder_head_dim,
            "decoder_hidden_dim": self.decoder_hidden_dim,
            "decoder_intermediate_dim": self.decoder_intermediate_dim,
            "decoder_num_layers": self.decoder_num_layers,
            "decoder_num_heads": self.decoder_num_heads,
            "decoder_num_key_value_heads": self.decoder_num_key_value_heads,
            "decoder_head_dim": self.decoder_head_dim,
            "encoder_layer_types": self.encoder_layer_types,
            "decoder_layer_types": self.decoder_layer_types,
            "sliding_window": self.sliding_window,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "rope_wavelength": self.rope_wavelength,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "encoder_only": self.encoder_only,
            "remat": self.remat,
        }
