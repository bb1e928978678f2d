"""T5Gemma 2 backbone: a Gemma 3 encoder and decoder sharing one embedding."""

import inspect

import keras
import numpy as np
from keras import ops

from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.layers.token_embedding import TokenEmbedding
from keras_t5gemma.layers.transformer import TransformerStack
from keras_t5gemma.layers.vision import ImageMerge
from keras_t5gemma.layers.vision import check_image_placeholders
from keras_t5gemma.models.encoder_decoder_backbone import EncoderDecoderBackbone
from keras_t5gemma.models.encoder_decoder_backbone import check_attention_sizes
from keras_t5gemma.models.encoder_decoder_backbone import check_layer_types
from keras_t5gemma.models.encoder_decoder_backbone import check_positive_int
from keras_t5gemma.models.encoder_decoder_backbone import check_regularisation
from keras_t5gemma.models.encoder_decoder_backbone import layer_arguments
from keras_t5gemma.utils.preset_utils import get_exporter


def default_layer_types(num_layers, full_attention_every=6):
    """Gemma 3's pattern: every sixth layer attends fully, the others slide."""
    return [FULL if (i + 1) % full_attention_every == 0 else SLIDING for i in range(num_layers)]


# Argument names this backbone took before it followed KerasHub's (presets and
# `.keras` files saved then still load): old name -> KerasHub's name. Each
# width and head setting then served both stacks.
LEGACY_ARGUMENTS = {
    "hidden_dim": ("encoder_hidden_dim", "decoder_hidden_dim"),
    "intermediate_dim": ("encoder_intermediate_dim", "decoder_intermediate_dim"),
    "num_heads": ("encoder_num_attention_heads", "decoder_num_attention_heads"),
    "num_key_value_heads": ("encoder_num_key_value_heads", "decoder_num_key_value_heads"),
    "head_dim": ("encoder_head_dim", "decoder_head_dim"),
    "num_encoder_layers": ("encoder_num_layers",),
    "num_decoder_layers": ("decoder_num_layers",),
    "local_rope_wavelength": ("rope_max_wavelength",),
    "global_rope_wavelength": ("global_rope_max_wavelength",),
    "layer_norm_epsilon": ("rms_norm_eps",),
    "attention_logit_soft_cap": ("attn_logit_softcapping",),
    "final_logit_soft_cap": ("final_logit_softcapping",),
    "dropout": ("dropout_rate",),
    "eoi_token_id": ("eoi_token_index",),
    "image_token_id": ("image_token_index",),
}
# Spellings of tanh-approximate GeLU (KerasHub's, transformers', ours).
GELU_TANH = ("gelu_approximate", "gelu_pytorch_tanh", "gelu_tanh")
STACK_SIZES = ("hidden_dim", "intermediate_dim", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
# The scalar arguments KerasHub 0.32's `T5Gemma2Backbone` has too, under the same names (its config keys).
SHARED_SCALARS = (
    "dropout_rate",
    "rms_norm_eps",
    "query_pre_attn_scalar",
    "initializer_range",
    "attention_dropout",
    "sliding_window",
    "cross_attention_hidden_size",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_max_wavelength",
    "global_rope_scaling_factor",
    "encoder_rope_max_wavelength",
    "encoder_global_rope_scaling_factor",
    "use_query_key_norm",
    "eoi_token_index",
)


def rope_settings(
    wavelength, global_wavelength, local_factor, global_factor, encoder_wavelength=None, encoder_global_factor=None
):
    """`{"encoder"|"decoder": {layer type: (wavelength, linear scaling factor)}}`.

    KerasHub's names: `rope_max_wavelength` is the sliding layers' base, and
    the encoder may override it and the full layers' factor.
    """
    decoder = {SLIDING: (wavelength, local_factor), FULL: (global_wavelength, global_factor)}
    encoder = {
        SLIDING: (wavelength if encoder_wavelength is None else encoder_wavelength, local_factor),
        FULL: (global_wavelength, global_factor if encoder_global_factor is None else encoder_global_factor),
    }
    return {"encoder": encoder, "decoder": decoder}


def migrate_legacy_arguments(kwargs):
    """`kwargs` with this backbone's earlier argument names moved to KerasHub's (in place).

    Raises:
        ValueError: when an old name and its new name are both given, differently.
    """
    for old, new_names in LEGACY_ARGUMENTS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        for new in new_names:
            if kwargs.get(new) is not None and kwargs[new] != value:
                raise ValueError(f"`{old}` (the earlier name of `{new}`) is {value!r} but `{new}` is {kwargs[new]!r}.")
            kwargs[new] = value
    return kwargs


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Backbone(EncoderDecoderBackbone):
    """T5Gemma 2 encoder-decoder backbone, with KerasHub's constructor arguments.

    A bidirectional Gemma 3 encoder and a Gemma 3 decoder whose attention
    covers its own (causal) keys and the encoder's keys in one softmax: the
    decoder's own `k_proj`/`v_proj` project the encoder output. One token
    embedding table serves the encoder input, the decoder input and the
    output projection (see `T5Gemma2Backbone.token_embedding.logits`). The two
    stacks may differ in MLP width, heads, key/value heads, head size, layer
    count and layer types; their widths must be equal, as the reference
    (transformers' `T5Gemma2Config`) requires.

    Inputs:
        encoder_token_ids: int `(B, S)`.
        encoder_padding_mask: int/bool `(B, S)`, 1 for real tokens.
        decoder_token_ids: int `(B, T)`.
        decoder_padding_mask: int/bool `(B, T)`.
        images: (only with a `vision_encoder`) float `(B, N, H, W, 3)`, N image
            slots per sample, converted by `T5Gemma2ImageConverter`. The k-th
            run of `num_vision_tokens_per_image` image placeholder tokens in a
            sample takes its k-th image; unused slots are padding. Samples may
            have 0, 1 or several images; `N` may be 0, and `images` may be left
            out for text-only input, in which case the vision tower runs on no
            images. (KerasHub also takes `vision_indices`; here the
            placeholders' positions are found from `image_token_index`.)
        encoder_segment_ids, decoder_segment_ids: optional int `(B, S)` and
            `(B, T)`, for packed rows (`training.packing.pack_examples`): 0
            for padding, k for the k-th example of a row in both. Attention
            stays inside each example, positions restart at its start, so
            each example's outputs are those it has alone. Leave both out
            (or `None`) for one example per row.

    Outputs (dict):
        encoder_sequence_output: `(B, S, encoder_hidden_dim)`.
        decoder_sequence_output: `(B, T, decoder_hidden_dim)`, after the final norm.

    Args (KerasHub 0.32's names and meanings):
        vocabulary_size: int.
        encoder_hidden_dim, encoder_intermediate_dim, encoder_num_layers,
        encoder_num_attention_heads, encoder_num_key_value_heads,
        encoder_head_dim: the encoder's sizes.
        decoder_*: the same for the decoder. `decoder_hidden_dim` must equal
            `encoder_hidden_dim`.
        encoder_layer_types, decoder_layer_types: optional lists of
            `"sliding_attention"` / `"full_attention"`; default every sixth
            layer full (KerasHub requires them).
        dropout_rate: float, on embeddings, block outputs, MLP activations and
            the stack outputs.
        rms_norm_eps: float.
        query_pre_attn_scalar: float, logits are scaled by its inverse square
            root. Defaults to the decoder's head size, as in the released
            configs (KerasHub defaults to 1.0).
        attention_bias: must be False (T5Gemma 2 has no attention biases).
        hidden_activation: tanh-approximate GeLU under any of its spellings
            (`"gelu_approximate"`, `"gelu_pytorch_tanh"`).
        tie_word_embeddings: must be True: one table serves both stacks and
            the head (KerasHub keeps a second table for the decoder).
        initializer_range: float, recorded for export (KerasHub draws initial
            weights with it; the layers here use their own initializers).
        attention_dropout: float, on attention probabilities.
        sliding_window: int, the stored window. The decoder sees the last
            `sliding_window` keys; the encoder splits it around each query.
            `None` is accepted only when no layer slides.
        cross_attention_hidden_size: optional int; must equal
            `encoder_hidden_dim` (the decoder projects the encoder output
            with its own key/value projections).
        attn_logit_softcapping, final_logit_softcapping: optional floats.
        rope_max_wavelength: float, the RoPE base of sliding layers.
        global_rope_scaling_factor: float, linear RoPE scaling of full layers.
        encoder_rope_max_wavelength, encoder_global_rope_scaling_factor:
            optional encoder-only overrides of the two above.
        use_query_key_norm: bool, RMSNorm on queries and keys (Gemma 3).
        vision_encoder: optional `T5Gemma2VisionEncoder`; without it the
            backbone is text-only.
        eoi_token_index: int, the end-of-image token with a learned embedding.

    Args (beyond KerasHub's):
        global_rope_max_wavelength: float, the RoPE base of full layers
            (1,000,000, which KerasHub hard-codes).
        local_rope_scaling_factor: float, linear RoPE scaling of sliding layers.
        image_token_index: int, the image placeholder token.
        encoder_only: bool. Build no decoder (for embeddings): the inputs are
            then only the encoder's, and the output only
            `encoder_sequence_output`.
        remat: bool. Recompute each transformer layer in the backward pass
            instead of keeping its activations, for training on long inputs:
            a gradient then holds each layer's input, not its activations.
            Off by default; inference is unaffected.
        dtype: dtype policy, e.g. `"float32"`, `"bfloat16"`, `"mixed_bfloat16"`.

    The names this backbone took before (`hidden_dim`, `num_heads`,
    `num_encoder_layers`, `layer_norm_epsilon`, `dropout`, `eoi_token_id`, ...,
    see `LEGACY_ARGUMENTS`) are still accepted as aliases, so presets and
    `.keras` files saved with them load; `get_config` writes KerasHub's names.

    Example:
    ```python
    backbone = T5Gemma2Backbone(
        vocabulary_size=300,
        encoder_hidden_dim=32, encoder_intermediate_dim=96, encoder_num_layers=3,
        encoder_num_attention_heads=4, encoder_num_key_value_heads=2, encoder_head_dim=8,
        decoder_hidden_dim=32, decoder_intermediate_dim=64, decoder_num_layers=2,
        decoder_num_attention_heads=2, decoder_num_key_value_heads=1, decoder_head_dim=16,
        sliding_window=4, eoi_token_index=298, image_token_index=299,
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
        encoder_hidden_dim=None,
        encoder_intermediate_dim=None,
        encoder_num_layers=None,
        encoder_num_attention_heads=None,
        encoder_num_key_value_heads=None,
        encoder_head_dim=None,
        encoder_layer_types=None,
        decoder_hidden_dim=None,
        decoder_intermediate_dim=None,
        decoder_num_layers=None,
        decoder_num_attention_heads=None,
        decoder_num_key_value_heads=None,
        decoder_head_dim=None,
        decoder_layer_types=None,
        dropout_rate=0.0,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=None,
        attention_bias=False,
        hidden_activation="gelu_approximate",
        tie_word_embeddings=True,
        initializer_range=0.02,
        attention_dropout=0.0,
        sliding_window=512,
        cross_attention_hidden_size=None,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        rope_max_wavelength=10_000.0,
        global_rope_scaling_factor=1.0,
        encoder_rope_max_wavelength=None,
        encoder_global_rope_scaling_factor=None,
        use_query_key_norm=True,
        vision_encoder=None,
        eoi_token_index=256_000,
        global_rope_max_wavelength=1_000_000.0,
        local_rope_scaling_factor=1.0,
        image_token_index=256_001,
        encoder_only=False,
        remat=False,
        dtype=None,
        **kwargs,
    ):
        given = {name: value for name, value in locals().items() if name not in ("self", "kwargs", "__class__")}
        legacy = {name: kwargs.pop(name) for name in list(kwargs) if name in LEGACY_ARGUMENTS}
        if legacy:
            # Old names fill in what the new ones left at their defaults.
            defaults = {
                name: parameter.default
                for name, parameter in inspect.signature(T5Gemma2Backbone.__init__).parameters.items()
            }
            explicit = {name: value for name, value in given.items() if value != defaults.get(name)}
            merged = migrate_legacy_arguments({**explicit, **legacy})
            return self.__init__(**{**given, **merged}, **kwargs)
        sides = {}
        for side in ("encoder", "decoder"):
            sizes = {name: given[f"{side}_{name}"] for name in STACK_SIZES}
            for name, value in sizes.items():
                check_positive_int(f"{side}_{name}", value)
            check_attention_sizes(
                f"{side}_",
                sizes["num_attention_heads"],
                sizes["num_key_value_heads"],
                sizes["head_dim"],
                heads_name="num_attention_heads",
            )
            sides[side] = sizes
        check_positive_int("vocabulary_size", vocabulary_size)
        if encoder_hidden_dim != decoder_hidden_dim:
            raise ValueError(
                f"`encoder_hidden_dim` ({encoder_hidden_dim}) and `decoder_hidden_dim` ({decoder_hidden_dim}) "
                "must be equal: T5Gemma 2's decoder projects the encoder output with its own key/value "
                "projections and shares one embedding table (transformers' T5Gemma2Config refuses it too)."
            )
        if cross_attention_hidden_size not in (None, encoder_hidden_dim):
            raise ValueError(
                f"`cross_attention_hidden_size` ({cross_attention_hidden_size}) must equal `encoder_hidden_dim` "
                f"({encoder_hidden_dim}) or be None."
            )
        if hidden_activation not in GELU_TANH:
            raise ValueError(
                f"`hidden_activation` {hidden_activation!r} is not supported; T5Gemma 2 uses tanh-approximate "
                f"GeLU ({', '.join(GELU_TANH)})."
            )
        if attention_bias:
            raise ValueError("`attention_bias=True` is not supported: T5Gemma 2 has no attention biases.")
        if not tie_word_embeddings:
            raise ValueError(
                "`tie_word_embeddings=False` is not supported: T5Gemma 2 shares one table between the encoder, "
                "the decoder and the output projection."
            )
        check_regularisation(
            dropout_rate,
            attention_dropout,
            attn_logit_softcapping,
            final_logit_softcapping,
            names=("dropout_rate", "attention_dropout"),
        )
        encoder_layer_types = list(encoder_layer_types or default_layer_types(encoder_num_layers))
        decoder_layer_types = list(decoder_layer_types or default_layer_types(decoder_num_layers))
        check_layer_types("encoder_layer_types", encoder_layer_types, encoder_num_layers)
        check_layer_types("decoder_layer_types", decoder_layer_types, decoder_num_layers)
        if sliding_window is None and SLIDING in encoder_layer_types + decoder_layer_types:
            raise ValueError("`sliding_window` is None but some layers are `sliding_attention`: give a window.")
        if sliding_window is not None:
            check_positive_int("sliding_window", sliding_window)
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = decoder_head_dim

        # === Layers ===
        self.token_embedding = TokenEmbedding(
            vocabulary_size,
            decoder_hidden_dim,
            eoi_token_id=eoi_token_index,
            logit_soft_cap=final_logit_softcapping,
            dtype=dtype,
            name="token_embedding",
        )
        rope = rope_settings(
            rope_max_wavelength,
            global_rope_max_wavelength,
            local_rope_scaling_factor,
            global_rope_scaling_factor,
            encoder_rope_max_wavelength,
            encoder_global_rope_scaling_factor,
        )

        def stack(side, layer_types, causal):
            sizes = sides[side]
            layer_kwargs = layer_arguments(
                sizes["intermediate_dim"],
                sizes["num_attention_heads"],
                sizes["num_key_value_heads"],
                sizes["head_dim"],
                query_pre_attn_scalar,
                rms_norm_eps,
                attn_logit_softcapping,
                attention_dropout,
                use_query_key_norm=use_query_key_norm,
            )
            return TransformerStack(
                layer_types,
                causal=causal,
                # A window wider than any sequence where no layer slides.
                sliding_window=sliding_window or 1,
                rope=rope[side],
                layer_kwargs=layer_kwargs,
                dropout=dropout_rate,
                remat=remat,
                dtype=dtype,
                name=side,
            )

        self.encoder = stack("encoder", encoder_layer_types, causal=False)
        self.decoder = None if encoder_only else stack("decoder", decoder_layer_types, causal=True)
        self.vision_encoder = vision_encoder
        if vision_encoder is not None:
            if vision_encoder.output_dim != encoder_hidden_dim:
                raise ValueError(
                    f"The vision encoder projects to {vision_encoder.output_dim} but the text width is "
                    f"{encoder_hidden_dim}."
                )
            self.image_merge = ImageMerge(image_token_index, dtype=dtype, name="image_merge")

        # === Functional model ===
        image_size = None if vision_encoder is None else vision_encoder.image_size
        self._build_functional_model(encoder_only, image_size=image_size, dtype=dtype, packed=True, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        for side, sizes in sides.items():
            for name, value in sizes.items():
                setattr(self, f"{side}_{name}", value)
        self.encoder_layer_types = encoder_layer_types
        self.decoder_layer_types = decoder_layer_types
        self.dropout_rate = dropout_rate
        self.rms_norm_eps = rms_norm_eps
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_bias = attention_bias
        self.hidden_activation = hidden_activation
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.cross_attention_hidden_size = encoder_hidden_dim
        self.attn_logit_softcapping = attn_logit_softcapping
        self.final_logit_softcapping = final_logit_softcapping
        self.rope_max_wavelength = rope_max_wavelength
        self.global_rope_scaling_factor = global_rope_scaling_factor
        self.encoder_rope_max_wavelength = encoder_rope_max_wavelength
        self.encoder_global_rope_scaling_factor = encoder_global_rope_scaling_factor
        self.use_query_key_norm = use_query_key_norm
        self.eoi_token_index = eoi_token_index
        self.global_rope_max_wavelength = global_rope_max_wavelength
        self.local_rope_scaling_factor = local_rope_scaling_factor
        self.image_token_index = image_token_index
        self.encoder_only = encoder_only
        self.remat = remat
        self.text_only_model = vision_encoder is None
        if vision_encoder is not None:
            self.num_vision_tokens_per_image = vision_encoder.mm_tokens_per_image

    @property
    def hidden_dim(self):
        """The model width, shared by both stacks (`encoder_hidden_dim`)."""
        return self.encoder_hidden_dim

    def stack_rope(self, side):
        """`{layer type: (wavelength, linear scaling factor)}` of the `"encoder"` or `"decoder"` stack."""
        return rope_settings(
            self.rope_max_wavelength,
            self.global_rope_max_wavelength,
            self.local_rope_scaling_factor,
            self.global_rope_scaling_factor,
            self.encoder_rope_max_wavelength,
            self.encoder_global_rope_scaling_factor,
        )[side]

    def encode(self, token_ids, padding_mask, images=None, training=False, segment_ids=None):
        """Encoder output `(B, S, D)`; images (if any) replace their placeholders.

        With `images=None` the vision tower is skipped. `segment_ids` `(B, S)`
        for packed rows (see `TransformerStack`).
        """
        embeddings = self.token_embedding(token_ids)
        if images is not None and self.vision_encoder is not None:
            features = self.vision_encoder(images, training=training)
            embeddings = self.image_merge(embeddings, token_ids, features)
        return self.encoder(embeddings, padding_mask, training=training, segment_ids=segment_ids)

    def with_default_images(self, inputs):
        """`inputs` with an empty `(B, 0, H, W, 3)` `images` entry if a vision model lacks one.

        Text-only input to a vision backbone keeps the functional signature this
        way, and the vision tower runs on no images.
        """
        if self.vision_encoder is None or not isinstance(inputs, dict) or inputs.get("images") is not None:
            return inputs
        token_ids = inputs["encoder_token_ids"]
        size = self.vision_encoder.image_size
        shape = (ops.shape(token_ids)[0], 0, size, size, 3)
        # Keras will not mix numpy and backend tensors in one call argument.
        zeros = np.zeros if isinstance(token_ids, np.ndarray) else ops.zeros
        return {**inputs, "images": zeros(shape, "float32")}

    def export_to_transformers(self, path, dtype=None, max_shard_size="2GB", overwrite=False):
        """Writes a Hugging Face `transformers` folder (`T5Gemma2ForConditionalGeneration`) of this backbone.

        The arguments and errors are those of `T5Gemma2Task.export_to_transformers`.
        """
        exporter = get_exporter("transformers")
        return exporter(self, path, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)

    def export_to_keras_hub(self, path, overwrite=False):
        """Writes a KerasHub 0.32 preset folder of this backbone (`keras_hub.models.T5Gemma2Backbone.from_preset`).

        See `conversion/keras_hub_export.py` for what KerasHub cannot hold
        (refused) and where it computes differently.
        """
        return get_exporter("keras-hub")(self, path, overwrite=overwrite)

    def _check_inputs(self, inputs):
        """Token ids in range and image placeholders matching the images (eager calls only)."""
        checked = super()._check_inputs(inputs)
        if "encoder_token_ids" in checked and self.vision_encoder is not None:
            check_image_placeholders(
                checked["encoder_token_ids"],
                ops.shape(inputs["images"])[1],
                self.image_token_index,
                self.vision_encoder.mm_tokens_per_image,
            )
        return checked

    def get_config(self):
        names = ["vocabulary_size"]
        for side in ("encoder", "decoder"):
            names += [f"{side}_{name}" for name in STACK_SIZES] + [f"{side}_layer_types"]
        names += [
            *SHARED_SCALARS,
            "attention_bias",
            "hidden_activation",
            "tie_word_embeddings",
            "global_rope_max_wavelength",
            "local_rope_scaling_factor",
            "image_token_index",
            "encoder_only",
            "remat",
        ]
        return {
            **super().get_config(),
            **{name: getattr(self, name) for name in names},
            "vision_encoder": None if self.vision_encoder is None else keras.layers.serialize(self.vision_encoder),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("vision_encoder"), dict):
            vision = _with_quantized_layers(config["vision_encoder"], config.get("dtype"))
            config["vision_encoder"] = keras.layers.deserialize(vision)
        return super().from_config(config)


def _with_quantized_layers(vision_config, dtype):
    """The vision encoder's config, given the quantized layers of the backbone's `dtype` policy map.

    A quantized backbone saves which layers are quantized as a
    `DTypePolicyMap` in its own `dtype`; the vision encoder is saved as a
    layer of its own, with its float policy, so without this it would be
    rebuilt with float kernels that its saved int8 weights do not fit.
    """
    policy = keras.dtype_policies.get(dtype) if isinstance(dtype, dict) else dtype
    if not isinstance(policy, keras.dtype_policies.DTypePolicyMap) or not len(policy):
        return vision_config
    own = vision_config["config"].get("dtype")
    vision_policy = keras.dtype_policies.DTypePolicyMap(
        default_policy=keras.dtype_policies.get(own) if own is not None else None,
        policy_map={path: policy[path] for path in policy},
    )
    return {**vision_config, "config": {**vision_config["config"], "dtype": vision_policy}}
