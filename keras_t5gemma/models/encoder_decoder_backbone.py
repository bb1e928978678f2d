"""What the encoder-decoder backbones of both generations share.

`T5Gemma2Backbone` and `T5GemmaBackbone` differ in the arguments of their
`TransformerStack`s (Gemma 3 or Gemma 2 layers, merged or separate
cross-attention, widths, RoPE), in their embedding tables and in the vision
tower. The argument checks, the layer arguments, the functional graph
(encoder inputs, an optional decoder), the input checks and the layout map are
written here once.
"""

import keras
import numpy as np
from keras import ops
from keras_hub.models import Backbone

from keras_t5gemma.layers.masks import LAYER_TYPES
from keras_t5gemma.models.quantization import quantize_projections
from keras_t5gemma.utils.preset_utils import PresetMixin

# Optional inputs of a backbone that takes packed rows (see `_build_functional_model`).
SEGMENT_INPUTS = ("encoder_segment_ids", "decoder_segment_ids")


def check_token_ids(inputs, vocabulary_size):
    """Refuses token ids that are not integers or lie outside `[0, vocabulary_size)`.

    An id outside the table gathers no row (zeros, or non-finite logits
    downstream) and a float id is silently truncated, so both are errors.
    Symbolic tensors (inside a trace) are skipped; this runs on the host,
    outside any compiled step.

    Args:
        inputs: dict with `encoder_token_ids` and/or `decoder_token_ids`.
        vocabulary_size: int, the embedding table's rows.

    Returns:
        `{key: token ids as a NumPy array}` for the inputs checked.

    Raises:
        ValueError: naming the input and the ids found.
    """
    checked = {}
    for key in ("encoder_token_ids", "decoder_token_ids"):
        if key not in inputs:
            continue
        try:
            token_ids = np.asarray(ops.convert_to_numpy(inputs[key]))
        except Exception:  # a symbolic tensor
            continue
        if token_ids.dtype.kind not in "iu":
            raise ValueError(f"`{key}` must hold integer token ids; got {token_ids.dtype} values.")
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocabulary_size):
            raise ValueError(
                f"`{key}` holds ids in [{token_ids.min()}, {token_ids.max()}], outside the "
                f"vocabulary of {vocabulary_size} tokens."
            )
        checked[key] = token_ids
    return checked


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")


def check_layer_types(name, layer_types, num_layers):
    if len(layer_types) != num_layers:
        raise ValueError(f"`{name}` has {len(layer_types)} entries but the stack has {num_layers} layers.")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"`{name}` has unknown layer types {unknown}; expected {list(LAYER_TYPES)}.")


def check_attention_sizes(prefix, num_heads, num_key_value_heads, head_dim, heads_name="num_heads"):
    """Grouped heads must divide evenly; RoPE rotates pairs, so `head_dim` is even.

    `heads_name`: the backbone's name for the query head count.
    """
    if num_heads % num_key_value_heads:
        raise ValueError(
            f"`{prefix}{heads_name}` ({num_heads}) must be a multiple of "
            f"`{prefix}num_key_value_heads` ({num_key_value_heads})."
        )
    if head_dim % 2:
        raise ValueError(f"`{prefix}head_dim` must be even for rotary embeddings; got {head_dim}.")


def check_regularisation(
    dropout, attention_dropout, attention_logit_soft_cap, final_logit_soft_cap, names=("dropout", "attention_dropout")
):
    """Rates in [0, 1), caps positive or None; `names` are the backbone's names of the two rates."""
    for name, rate in zip(names, (dropout, attention_dropout)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1); got {rate}.")
    for name, cap in (
        ("attention_logit_soft_cap", attention_logit_soft_cap),
        ("final_logit_soft_cap", final_logit_soft_cap),
    ):
        if cap is not None and not cap > 0:
            raise ValueError(f"`{name}` must be positive or None; got {cap}.")


def layer_arguments(
    intermediate_dim,
    num_heads,
    num_key_value_heads,
    head_dim,
    query_pre_attn_scalar,
    layer_norm_epsilon,
    attention_logit_soft_cap,
    attention_dropout,
    **extra,
):
    """`TransformerLayer` arguments from a backbone's (`extra`: what a generation adds)."""
    return {
        "intermediate_dim": intermediate_dim,
        "num_heads": num_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "query_scale": float(query_pre_attn_scalar) ** -0.5,
        "layer_norm_epsilon": layer_norm_epsilon,
        "attention_soft_cap": attention_logit_soft_cap,
        "attention_dropout": attention_dropout,
        **extra,
    }


class EncoderDecoderBackbone(PresetMixin, Backbone):
    """Base of the T5Gemma backbones: the functional graph, input checks, `quantize` and `from_preset`.

    A subclass builds `token_embedding`, `encoder` and `decoder` (None when
    `encoder_only`), defines `encode(token_ids, padding_mask, images)` and
    calls `_build_functional_model`. Its own `_check_inputs` may add checks.
    """

    def _build_functional_model(self, encoder_only, image_size=None, dtype=None, packed=False, **kwargs):
        """Inputs and outputs of the backbone (see the subclasses' docstrings), then `Backbone.__init__`.

        `image_size`: adds an `images` input `(B, N, image_size, image_size, 3)`.
        `packed`: adds the optional inputs `encoder_segment_ids` and
        `decoder_segment_ids` (packed rows; `None` or absent for unpacked
        input, so models and files without them run unchanged); `encode`
        then takes `segment_ids`.
        """
        encoder_token_ids = keras.Input((None,), dtype="int32", name="encoder_token_ids")
        encoder_padding_mask = keras.Input((None,), dtype="int32", name="encoder_padding_mask")
        inputs = {"encoder_token_ids": encoder_token_ids, "encoder_padding_mask": encoder_padding_mask}
        images = None
        if image_size is not None:
            images = keras.Input((None, image_size, image_size, 3), name="images")
            inputs["images"] = images
        segments = {}
        if packed:
            names = SEGMENT_INPUTS[:1] if encoder_only else SEGMENT_INPUTS
            segments = {name: keras.Input((None,), dtype="int32", name=name, optional=True) for name in names}
        self._segment_inputs = tuple(segments)
        encoder_segment_ids = segments.get("encoder_segment_ids")
        encoder_output = self.encode(
            encoder_token_ids, encoder_padding_mask, images, **({"segment_ids": encoder_segment_ids} if packed else {})
        )
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
                segment_ids=segments.get("decoder_segment_ids"),
                encoder_segment_ids=encoder_segment_ids,
            )
        inputs.update(segments)
        super().__init__(inputs=inputs, outputs=outputs, dtype=dtype, **kwargs)

    def with_default_images(self, inputs):
        """`inputs` unchanged; a vision backbone fills in an empty `images` entry here."""
        return inputs

    def with_default_segments(self, inputs):
        """Backbone (or language model) inputs with `None` for absent segment ids: one example per row."""
        if not isinstance(inputs, dict) or "encoder_token_ids" not in inputs:
            return inputs
        missing = [name for name in getattr(self, "_segment_inputs", ()) if name not in inputs]
        return {**inputs, **dict.fromkeys(missing)} if missing else inputs

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self.with_default_segments(self.with_default_images(inputs)), *args, **kwargs)

    def compute_output_spec(self, inputs, *args, **kwargs):
        # Keras' shape inference takes no `None` for an optional input (a
        # task's graph built without segment ids); the output shapes do not
        # depend on them, and the padding masks have their shapes.
        if isinstance(inputs, dict):
            stand_ins = {
                name: inputs[name.replace("segment_ids", "padding_mask")]
                for name in getattr(self, "_segment_inputs", ())
                if inputs.get(name) is None
            }
            inputs = {**inputs, **stand_ins}
        return super().compute_output_spec(inputs, *args, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras `quantize`, by default over the float projections and embedding tables (`quantizable`)."""
        quantize_projections(super().quantize, mode, config=config, filters=filters, **kwargs)

    def default_lora_layer_names(self):
        """KerasHub's names (queries and values), and `query_key_value`, the fused projection holding them here.

        LoRA on the fused `(D, N + 2K, H)` kernel is Keras' `EinsumDense` LoRA:
        per head a `(D, rank)` factor, and one `(rank, H)` factor the query,
        key and value heads share; so the keys are adapted too.
        """
        return [*super().default_lora_layer_names(), "query_key_value"]

    def call(self, inputs, training=None, mask=None):
        # The images are checked with the placeholders, so they are filled in first.
        inputs = self.with_default_segments(self.with_default_images(inputs))
        if isinstance(inputs, dict):
            self._check_inputs(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _check_inputs(self, inputs):
        """Token ids in range; only on concrete inputs (eager calls).

        Traced calls (`fit`, `predict`, `generate`) are checked before
        tracing, by the task and the preprocessor.

        Returns:
            the checked token ids (see `check_token_ids`).
        """
        return check_token_ids(inputs, self.vocabulary_size)

    @classmethod
    def get_layout_map(cls, device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
        """A `keras.distribution.LayoutMap` sharding every backbone weight.

        Large matrices are split over `model_parallel_dim_name` (vocabulary,
        MLP width, or the model width D for attention, since the released
        query and key/value head counts, 4/1 and 8/4, do not divide a model
        axis of 8) and, except attention, over `data_parallel_dim_name` too;
        norms, biases and vectors are replicated. LoRA kernels added by
        `enable_lora` are sharded like the kernel they adapt. See
        `keras_t5gemma/models/layout.py` for the reasons.

        Example:
        ```python
        devices = keras.distribution.list_devices()  # e.g. 8 TPU cores
        mesh = keras.distribution.DeviceMesh(shape=(1, 8), axis_names=("batch", "model"), devices=devices)
        layout_map = T5Gemma2Backbone.get_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        with distribution.scope():
            seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
            seq_2_seq_lm.backbone.enable_lora(rank=8)
        for variable in seq_2_seq_lm.backbone.weights[:8]:
            print(variable.path, variable.value.sharding.spec)
        ```

        Args:
            device_mesh: `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: str, the mesh axis weights are split over.
            data_parallel_dim_name: str, the mesh axis batches are split over.

        Returns:
            `keras.distribution.LayoutMap`.
        """
        from keras_t5gemma.models.layout import layout_map

        return layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)
