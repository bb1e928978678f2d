"""T5Gemma (first generation) backbone: a Gemma 2 encoder and decoder, text only."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import Backbone

from keras_t5gemma.layers.cross_attention_transformer import CrossAttentionTransformerStack
from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import LAYER_TYPES
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.token_embedding import TokenEmbedding
from keras_t5gemma.models.model_mixins import QuantizeProjectionsMixin
from keras_t5gemma.utils.preset_utils import PresetMixin


def alternating_layer_types(num_layers):
    """Gemma 2's pattern: sliding and full attention alternate, sliding first."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaBackbone(PresetMixin, QuantizeProjectionsMixin, Backbone):
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
        _positive_int("vocabulary_size", vocabulary_size)
        _positive_int("sliding_window", sliding_window)
        for side, sizes in sides.items():
            names = ("hidden_dim", "intermediate_dim", "num_layers", "num_heads", "num_key_value_heads", "head_dim")
            for name, value in zip(names, sizes):
                _positive_int(f"{side}_{name}", value)
            num_heads, num_key_value_heads, head_dim = sizes[3:]
            if num_heads % num_key_value_heads:
                raise ValueError(
                    f"`{side}_num_heads` ({num_heads}) must be a multiple of "
                    f"`{side}_num_key_value_heads` ({num_key_value_heads})."
                )
            if head_dim % 2:
                raise ValueError(f"`{side}_head_dim` must be even for rotary embeddings; got {head_dim}.")
        for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1); got {rate}.")
        for name, cap in (
            ("attention_logit_soft_cap", attention_logit_soft_cap),
            ("final_logit_soft_cap", final_logit_soft_cap),
        ):
            if cap is not None and not cap > 0:
                raise ValueError(f"`{name}` must be positive or None; got {cap}.")
        encoder_layer_types = list(encoder_layer_types or alternating_layer_types(encoder_num_layers))
        decoder_layer_types = list(decoder_layer_types or alternating_layer_types(decoder_num_layers))
        for side, layer_types, num_layers in (
            ("encoder", encoder_layer_types, encoder_num_layers),
            ("decoder", decoder_layer_types, decoder_num_layers),
        ):
            if len(layer_types) != num_layers:
                raise ValueError(
                    f"`{side}_layer_types` has {len(layer_types)} entries but the {side} has {num_layers} layers."
                )
            unknown = sorted(set(layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(
                    f"`{side}_layer_types` has unknown layer types {unknown}; expected {list(LAYER_TYPES)}."
                )

        # === Layers ===
        def embedding(hidden_dim, logit_soft_cap, name):
            return TokenEmbedding(
                vocabulary_size, hidden_dim, eoi_token_id=None, logit_soft_cap=logit_soft_cap, dtype=dtype, name=name
            )

        def stack(side, layer_types, causal, window):
            hidden_dim, intermediate_dim, _, num_heads, num_key_value_heads, head_dim = sides[side]
            layer_kwargs = {
                "intermediate_dim": intermediate_dim,
                "num_heads": num_heads,
                "num_key_value_heads": num_key_value_heads,
                "head_dim": head_dim,
                "query_scale": float(query_pre_attn_scalar) ** -0.5,
                "layer_norm_epsilon": layer_norm_epsilon,
                "attention_soft_cap": attention_logit_soft_cap,
                "attention_dropout": attention_dropout,
            }
            if causal:
                layer_kwargs["cross_attention_dim"] = encoder_hidden_dim
            return CrossAttentionTransformerStack(
                layer_types,
                causal=causal,
                sliding_window=window,
                rope={SLIDING: (rope_wavelength, 1.0), FULL: (rope_wavelength, 1.0)},
                layer_kwargs=layer_kwargs,
                dropout=dropout,
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
        encoder_token_ids = keras.Input((None,), dtype="int32", name="encoder_token_ids")
        encoder_padding_mask = keras.Input((None,), dtype="int32", name="encoder_padding_mask")
        inputs = {"encoder_token_ids": encoder_token_ids, "encoder_padding_mask": encoder_padding_mask}
        encoder_output = self.encode(encoder_token_ids, encoder_padding_mask)
        outputs = {"encoder_sequence_output": encoder_output}
        if not encoder_only:
            decoder_token_ids = keras.Input((None,), dtype="int32", name="decoder_token_ids")
            decoder_padding_mask = keras.Input((None,), dtype="int32", name="decoder_padding_mask")
            inputs["decoder_token_ids"] = decoder_token_ids
            inputs["decoder_padding_mask"] = decoder_padding_mask
            outputs["decoder_sequence_output"] = self.decoder(
                self.token_embedding(decoder_token_ids),
                decoder_padding_mask,
                encoder_output,
                encoder_padding_mask,
            )
        super().__init__(inputs=inputs, outputs=outputs, dtype=dtype, **kwargs)

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

    def encode(self, token_ids, padding_mask, images=None, training=False):
        """Encoder output `(B, S, encoder_hidden_dim)`. Text only: `images` must be None."""
        if images is not None:
            raise ValueError("T5Gemma is a text-only model; it takes no images.")
        return self.encoder(self.encoder_token_embedding(token_ids), padding_mask, training=training)

    def with_default_images(self, inputs):
        """`inputs` unchanged: a text-only model needs no image entry (tasks shared with T5Gemma 2 call this)."""
        return inputs

    def call(self, inputs, training=None, mask=None):
        if isinstance(inputs, dict):
            self._check_inputs(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _check_inputs(self, inputs):
        """Token ids in range; only on concrete (eager) inputs."""
        if "images" in inputs:
            raise ValueError("T5Gemma is a text-only model; it takes no `images`.")
        for key in ("encoder_token_ids", "decoder_token_ids"):
            if key not in inputs:
                continue
            try:
                token_ids = np.asarray(ops.convert_to_numpy(inputs[key]))
            except Exception:
                return
            if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocabulary_size):
                raise ValueError(
                    f"`{key}` holds ids in [{token_ids.min()}, {token_ids.max()}], outside the "
                    f"vocabulary of {self.vocabulary_size} tokens."
                )

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
        }

    @classmethod
    def get_layout_map(cls, device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
        """A `keras.distribution.LayoutMap` sharding every backbone weight.

        The same rules as `T5Gemma2Backbone.get_layout_map` (see
        `keras_t5gemma/models/t5gemma2_layout.py`); the cross-attention
        projections and the encoder's own table follow them.
        """
        from keras_t5gemma.models.t5gemma2_layout import layout_map

        return layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)
