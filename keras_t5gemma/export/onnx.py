"""Export a `T5Gemma2Seq2SeqLM` or a `T5GemmaSeq2SeqLM` to ONNX graphs that generate with a static cache.

Both families write the same graphs, inputs and outputs; `t5gemma2_onnx.json`
says which (`family`), and the graphs carry the difference: the first
family's decoder layers attend to the cross keys/values in blocks of their
own (T5Gemma 2's inside their self-attention), with soft-capped attention
logits and final logits, and its encoder reads a table of its own.

The folder written by `export_onnx`:

- `encoder.onnx`: `encoder_token_ids` int64 `(B, S)`, `encoder_padding_mask`
  int64 `(B, S)` and, for a vision model, `pixel_values` float32
  `(B, N, H, W, 3)` (converted images, N slots per sample, N may be 0) in;
  `encoder_output` `(B, S, D)` and every decoder layer's `cross_key_{i}` /
  `cross_value_{i}` `(B, S, K, H)` out, so that they are computed once per
  request.
- `decoder.onnx`: `decoder_token_ids` int64 `(B, T)` at positions
  `cache_position + t` (`cache_position` int64 `(1,)`; T = 1 for a step, more
  for a prefill chunk), `encoder_padding_mask`, `past_key_{i}` /
  `past_value_{i}` `(B, L, K, H)` with L = `max_decode_length`, and the
  cross keys/values in; `logits` `(B, T, V)` and `present_key_{i}` /
  `present_value_{i}` (the caches with the chunk written) out.
- `embedder.onnx`: the encoder inputs in; `embedding` `(B, D)`, the pooled
  (and, if `normalize`, L2-normalised) encoder output as `T5Gemma2Embedder`
  (`T5GemmaEmbedder`) gives it, and for a vision model `image_embedding` `(B, D)`, the mean of
  the image soft tokens of all of a sample's image slots (the embedder's
  image-only vector).
- `weights.data`: the graphs' weights (ONNX external data), each stored once
  though several graphs read it (the embedding tables, the encoder).
- `tokenizer.spm` (SentencePiece) and `t5gemma2_onnx.json`: special ids,
  prompt layout, image-converter settings, shapes, opset, file names.

These are the float32 (`fp32`) graph set. Each other precision exported
(`fp16`, `int8`, `q4`, `q4f16`; see `export_onnx`) adds its own set beside
it, the same names ending in the precision (`encoder_q4.onnx`,
`decoder_q4.onnx`, `embedder_q4.onnx`, `weights_q4.data`), all sharing the
tokenizer and `t5gemma2_onnx.json` (`precisions`: each set's files, weight
format, activations' dtype and size). In float16 sets the caches and cross
keys/values are float16; `encoder_output`, `logits` and the embeddings are
float32 in every set.

`t5gemma_onnx.OnnxSeq2SeqLM` (the top-level `t5gemma_onnx` package) generates and embeds from the
folder with numpy, onnxruntime and sentencepiece only.

Example:
```python
import tempfile

seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
folder = tempfile.mkdtemp()
export_onnx(seq_2_seq_lm, folder, max_decode_length=16)
```
"""

import json
import math
import time
from pathlib import Path

import numpy as np

from keras_t5gemma.export import onnx_graph as graph
from keras_t5gemma.export.onnx_graph import GraphBuilder
from keras_t5gemma.utils.safe_files import atomic_folder

CONFIG_FILE = "t5gemma2_onnx.json"
# The float32 graph set's files; other precisions add a suffix (`precision_files`).
FILES = {
    "encoder": "encoder.onnx",
    "decoder": "decoder.onnx",
    "embedder": "embedder.onnx",
    "tokenizer": "tokenizer.spm",
    "weights": "weights.data",
}
GRAPHS = ("encoder", "decoder", "embedder")
PRECISIONS = tuple(graph.PRECISIONS)
# Version 2 adds `precisions` (several graph sets in one folder); version 1
# folders (one set, `files` and `quantization` only) still load.
FORMAT_VERSION = 2
POOLING_MODES = ("mean", "first", "last")


def precision_files(precision):
    """The graph and weights file names of one precision's graph set.

    fp32 keeps the names of single-precision exports (`encoder.onnx`,
    `weights.data`); the others end in the precision (`encoder_q4.onnx`,
    `weights_q4.data`), so that one precision's files can be copied alone.
    """
    suffix = "" if precision == "fp32" else f"_{precision}"
    return {name: f"{name}{suffix}.onnx" for name in GRAPHS} | {"weights": f"weights{suffix}.data"}


def parse_precisions(precision=None, quantize=None):
    """The precisions to export, in order, from `precision` (a name, a comma-separated string or a list).

    `quantize="int8"`, the earlier argument, means `precision="int8"`.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"`quantize` must be None or 'int8'; got {quantize!r}.")
    if precision is None:
        return ["int8" if quantize else "fp32"]
    if quantize is not None:
        raise ValueError("Pass `precision` or `quantize`, not both (`quantize='int8'` is `precision='int8'`).")
    names = precision.split(",") if isinstance(precision, str) else list(precision)
    names = [str(name).strip() for name in names]
    unknown = [name for name in names if name not in PRECISIONS]
    if unknown or not names:
        raise ValueError(f"Unknown precision {unknown or names}; choose from {', '.join(PRECISIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"A precision is listed twice: {names}.")
    return names


def _array(variable):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(variable), dtype=np.float32)


def _check_not_quantized(layer):
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise ValueError(
            f"Layer `{layer.path}` is quantized ({mode}) in Keras; the ONNX export reads float weights. Export "
            "the float model and pick the graphs' precision with `precision=` ('int8', 'q4', 'q4f16', 'fp16')."
        )


def _kernel(layer, shape):
    """A Dense/EinsumDense kernel (LoRA merged in by Keras) as a `shape` matrix."""
    _check_not_quantized(layer)
    return _array(layer.kernel).reshape(shape)


def _query_key_value(attention, hidden):
    """`{"query": ..., "key": ..., "value": ...}` kernels `(width, heads * H)`, and `*_bias` `(heads * H,)` if any.

    A fused `query_key_value` kernel's three parts: the graphs keep a product each.
    """
    if not attention.fused:  # a cross-attention block (no biases): keys and values read the encoder's width
        width = attention.key_value_dim
        return {
            "query": _kernel(attention.query_dense, (hidden, -1)),
            "key": _kernel(attention.key_dense, (width, -1)),
            "value": _kernel(attention.value_dense, (width, -1)),
        }
    fused = attention.query_key_value_dense
    kernel = _kernel(fused, (hidden, -1, attention.head_dim))
    bias = _array(fused.bias) if attention.use_bias else None
    weights = {}
    for i, name in enumerate(("query", "key", "value")):
        start, stop = fused.part_span(i)
        weights[name] = kernel[:, start:stop].reshape(hidden, -1)
        if bias is not None:
            weights[f"{name}_bias"] = bias[start:stop].reshape(-1)
    return weights


def _attention_weights(attention, hidden):
    """Numpy weights of an `Attention` whose queries read width `hidden` (its keys/values may read another)."""
    weights = {**_query_key_value(attention, hidden), "output": _kernel(attention.output_dense, (-1, hidden))}
    if attention.use_query_key_norm:
        weights["query_norm"] = _array(attention.query_norm.scale)
        weights["key_norm"] = _array(attention.key_norm.scale)
    return weights


def text_layer_weights(layer):
    """Numpy weights of a `TransformerLayer` (with its cross-attention block when it has one)."""
    attention, feedforward = layer.attention, layer.feedforward
    hidden = layer.pre_attention_norm.scale.shape[0]
    # The fused `(D, 2, I)` kernel's two parts: the graphs keep a product each.
    gate_up = _kernel(feedforward.gate_up_dense, (hidden, 2, -1))
    weights = {
        "pre_attention_norm": _array(layer.pre_attention_norm.scale),
        "post_attention_norm": _array(layer.post_attention_norm.scale),
        "pre_feedforward_norm": _array(layer.pre_feedforward_norm.scale),
        "post_feedforward_norm": _array(layer.post_feedforward_norm.scale),
        "attention": _attention_weights(attention, hidden),
        "feedforward": {
            "gate": gate_up[:, 0],
            "up": gate_up[:, 1],
            "down": _kernel(feedforward.down_dense, (-1, hidden)),
        },
    }
    if layer.cross_attention is not None:
        weights["pre_cross_attention_norm"] = _array(layer.pre_cross_attention_norm.scale)
        weights["post_cross_attention_norm"] = _array(layer.post_cross_attention_norm.scale)
        weights["cross_attention"] = _attention_weights(layer.cross_attention, hidden)
    return weights


def vision_weights(vision_encoder):
    """Numpy weights of a `T5Gemma2VisionEncoder`."""

    def norm(layer):
        return {"gamma": _array(layer.gamma), "beta": _array(layer.beta)}

    def bias(layer, shape):
        return _array(layer.bias).reshape(shape)

    hidden = vision_encoder.hidden_dim
    layers = []
    for layer in vision_encoder.vision_layers:
        attention, feedforward = layer.attention, layer.feedforward
        parts = _query_key_value(attention, hidden)
        parts["output"] = _kernel(attention.output_dense, (-1, hidden))
        parts["output_bias"] = bias(attention.output_dense, (-1,))
        layers.append(
            {
                "attention_norm": norm(layer.attention_norm),
                "feedforward_norm": norm(layer.feedforward_norm),
                "attention": parts,
                "feedforward": {
                    "up": _kernel(feedforward.up_dense, (hidden, -1)),
                    "up_bias": bias(feedforward.up_dense, (-1,)),
                    "down": _kernel(feedforward.down_dense, (-1, hidden)),
                    "down_bias": bias(feedforward.down_dense, (-1,)),
                },
            }
        )
    _check_not_quantized(vision_encoder.patch_embedding)
    return {
        "patch_kernel": _array(vision_encoder.patch_embedding.kernel),
        "patch_bias": _array(vision_encoder.patch_embedding.bias),
        "position_embedding": _array(vision_encoder.position_embedding),
        "layers": layers,
        "final_norm": norm(vision_encoder.final_norm),
        "projector_norm": _array(vision_encoder.projector_norm.scale),
        "projection": _kernel(vision_encoder.projection, (hidden, -1)),
    }


def _stack_config(stack, hidden_dim):
    """One stack's settings, read from its `TransformerStack` (what may differ between stacks and families)."""
    layer = stack.layer_kwargs
    return {
        "hidden_dim": hidden_dim,
        "num_heads": layer["num_heads"],
        "num_key_value_heads": layer["num_key_value_heads"],
        "head_dim": layer["head_dim"],
        "query_scale": float(layer["query_scale"]),
        "layer_norm_epsilon": layer["layer_norm_epsilon"],
        "attention_soft_cap": layer["attention_soft_cap"],
        "use_query_key_norm": layer.get("use_query_key_norm", True),
        # In the stack's convention (`masks.window_reach`): the encoder's
        # bidirectional split of it is the graphs' too.
        "sliding_window": stack.sliding_window,
        "rope": {layer_type: list(rope) for layer_type, rope in stack.rope.items()},
    }


def stack_config(config, side):
    """`config` with the `"encoder"` or `"decoder"` stack's settings at the top, as the layer graphs read them."""
    return {**config, **config[side]}


def model_config(backbone):
    """The hyperparameters the graphs need, from a `T5Gemma2Backbone` or a `T5GemmaBackbone`.

    What belongs to one stack (sizes, window, RoPE, norms, soft cap) sits
    under `"encoder"` and `"decoder"` (see `stack_config`); the top level
    repeats the decoder's, which the runtime's caches follow. The families
    differ by data: `family`, `cross_attention` (`"merged"`: T5Gemma 2's
    encoder keys inside the self-attention softmax; `"separate"`: the first
    family's own cross-attention block), the encoder's table (shared or its
    own, `model_weights`) and `eoi_token_id` (None without an end-of-image
    vector).
    """
    decoder_layers = backbone.decoder.transformer_layers
    separate = decoder_layers[0].cross_attention is not None
    decoder_embedding = backbone.token_embedding
    decoder = _stack_config(backbone.decoder, backbone.decoder_hidden_dim)
    config = {
        "family": "t5gemma" if separate else "t5gemma2",
        "cross_attention": "separate" if separate else "merged",
        "vocabulary_size": backbone.vocabulary_size,
        **decoder,
        "encoder": _stack_config(backbone.encoder, backbone.encoder_hidden_dim),
        "decoder": decoder,
        "num_encoder_layers": len(backbone.encoder.transformer_layers),
        "num_decoder_layers": len(decoder_layers),
        "encoder_layer_types": list(backbone.encoder.layer_types),
        "decoder_layer_types": list(backbone.decoder.layer_types),
        "final_logit_soft_cap": decoder_embedding.logit_soft_cap,
        "eoi_token_id": decoder_embedding.eoi_token_id,
        "image_token_id": getattr(backbone, "image_token_index", None),
        "vision": None,
    }
    vision = backbone.vision_encoder
    if vision is not None:
        config["vision"] = {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "patches_per_side": vision.patches_per_side,
            "tokens_per_side": math.isqrt(vision.mm_tokens_per_image),
            "mm_tokens_per_image": vision.mm_tokens_per_image,
            "hidden_dim": vision.hidden_dim,
            "num_heads": vision.num_heads,
            "layer_norm_epsilon": vision.layer_norm_epsilon,
        }
    return config


def _table(embedding, name):
    _check_not_quantized(embedding.table)
    return {"name": name, "table": _array(embedding.table.embeddings)}


def model_weights(backbone):
    """All numpy weights the graphs read, float32 (LoRA merged).

    `tables`: the encoder's and the decoder's embedding tables, each with
    the name its graphs store it under; T5Gemma 2 ties one table to both (one
    name, stored once), the first family gives the encoder its own.
    """
    decoder_table = _table(backbone.token_embedding, "token_embedding.table")
    encoder_embedding = getattr(backbone, "encoder_token_embedding", None)
    encoder_table = decoder_table
    if encoder_embedding is not None:
        encoder_table = _table(encoder_embedding, "encoder_token_embedding.table")
    eoi_embedding = None
    if backbone.token_embedding.eoi_token_id is not None:
        eoi_embedding = _array(backbone.token_embedding.eoi_embedding)
    weights = {
        "tables": {"encoder": encoder_table, "decoder": decoder_table},
        "eoi_embedding": eoi_embedding,
        "encoder": [text_layer_weights(layer) for layer in backbone.encoder.transformer_layers],
        "encoder_final_norm": _array(backbone.encoder.final_norm.scale),
        "decoder": [text_layer_weights(layer) for layer in backbone.decoder.transformer_layers],
        "decoder_final_norm": _array(backbone.decoder.final_norm.scale),
    }
    if backbone.vision_encoder is not None:
        weights["vision"] = vision_weights(backbone.vision_encoder)
    return weights


def _embedding_table(g, weights, side):
    table = weights["tables"][side]
    return graph.embedding_table(g, table["table"], table["name"])


# === Graphs ===


def _encoder_inputs(g, config):
    token_ids = g.input("encoder_token_ids", "int64", ["batch", "encoder_length"])
    padding_mask = g.input("encoder_padding_mask", "int64", ["batch", "encoder_length"])
    images = None
    if config["vision"] is not None:
        size = config["vision"]["image_size"]
        images = g.input("pixel_values", "float32", ["batch", "images", size, size, 3])
    return token_ids, padding_mask, images


def _image_features(g, images, weights, config):
    """`(B, N, H, W, 3)` images to float32 `(B, N * mm_tokens, D)` soft tokens (`config`: the encoder's)."""
    vision = config["vision"]
    size = vision["image_size"]
    batch, slots = g.dim(images, 0), g.dim(images, 1)
    flat = g.reshape(images, [g.op("Mul", [batch, slots]), size, size, 3])
    features = graph.vision_tower(g, flat, weights["vision"], vision)
    tokens = g.op("Mul", [slots, g.const([vision["mm_tokens_per_image"]])])
    return g.to_float32(g.reshape(features, [batch, tokens, config["hidden_dim"]]))


def _encode(g, weights, config, token_ids, padding_mask, images):
    """The encoder output `(B, S, D)`, and the image features when there are images."""
    config = stack_config(config, "encoder")
    table = _embedding_table(g, weights, "encoder")
    x = graph.token_embedding(g, token_ids, table, weights["eoi_embedding"], config["eoi_token_id"], "token_embedding")
    features = None
    if images is not None:
        features = _image_features(g, images, weights, config)
        x = graph.image_merge(g, x, token_ids, features, config["image_token_id"])
    positions = g.arange(g.dim(token_ids, 1))
    masks, ropes = graph.stack_masks_and_ropes(
        g,
        config,
        config["encoder_layer_types"],
        positions,
        positions,
        causal=False,
        key_padding_mask=padding_mask,
    )
    for index, (layer, layer_type) in enumerate(zip(weights["encoder"], config["encoder_layer_types"])):
        x = graph.transformer_layer(g, x, layer, f"encoder.layer_{index}", config, masks[layer_type], ropes[layer_type])
    epsilon = config["layer_norm_epsilon"]
    x = graph.rms_norm(g, x, weights["encoder_final_norm"], "encoder.final_norm", epsilon, keep_float32=True)
    return x, features


def encoder_graph(weights, config, precision=None):
    """Encoder output and the decoder's per-layer cross keys/values (a `GraphBuilder`).

    The cross keys/values project the encoder output with each decoder
    layer's attention (T5Gemma 2) or its cross-attention block (the first
    family), whose key/value kernels read the encoder's width.
    """
    g = GraphBuilder(f"{config['family']}_encoder", precision)
    token_ids, padding_mask, images = _encoder_inputs(g, config)
    encoder_output, _ = _encode(g, weights, config, token_ids, padding_mask, images)
    width = config["encoder"]["hidden_dim"]
    g.output("encoder_output", encoder_output, "float32", ["batch", "encoder_length", width])
    config = stack_config(config, "decoder")
    kv_shape = ["batch", "encoder_length", config["num_key_value_heads"], config["head_dim"]]
    for index, layer in enumerate(weights["decoder"]):
        block = "cross_attention" if "cross_attention" in layer else "attention"
        name = f"decoder.layer_{index}.{block}"
        key, value = graph.key_value(g, encoder_output, layer[block], name, config)
        g.output(f"cross_key_{index}", key, g.activation, kv_shape)
        g.output(f"cross_value_{index}", value, g.activation, kv_shape)
    return g


def decoder_graph(weights, config, max_decode_length, precision=None):
    """A chunk of decoder tokens against the static self-attention cache (in the activations' dtype)."""
    g = GraphBuilder(f"{config['family']}_decoder", precision, {"max_decode_length": max_decode_length})
    config = stack_config(config, "decoder")
    table = _embedding_table(g, weights, "decoder")
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    token_ids = g.input("decoder_token_ids", "int64", ["batch", "decoder_length"])
    start = g.input("cache_position", "int64", [1])
    encoder_padding_mask = g.input("encoder_padding_mask", "int64", ["batch", "encoder_length"])
    cache_shape = ["batch", max_decode_length, kv_heads, head_dim]
    cross_shape = ["batch", "encoder_length", kv_heads, head_dim]
    caches, cross = [], []
    for index in range(config["num_decoder_layers"]):
        caches.append(
            (
                g.input(f"past_key_{index}", g.activation, cache_shape),
                g.input(f"past_value_{index}", g.activation, cache_shape),
            )
        )
    for index in range(config["num_decoder_layers"]):
        cross.append(
            (
                g.input(f"cross_key_{index}", g.activation, cross_shape),
                g.input(f"cross_value_{index}", g.activation, cross_shape),
            )
        )

    x = graph.token_embedding(g, token_ids, table, weights["eoi_embedding"], config["eoi_token_id"], "token_embedding")
    query_positions = g.arange(g.dim(token_ids, 1), start=start)
    key_positions = g.arange(g.const([max_decode_length]))
    masks, ropes = graph.stack_masks_and_ropes(
        g, config, config["decoder_layer_types"], query_positions, key_positions, causal=True
    )
    cross_mask = graph.padding_mask_for_keys(g, encoder_padding_mask)  # (B, 1, S)
    if config["cross_attention"] == "merged":
        # One softmax: the causal self mask, then the encoder padding mask.
        batch_and_length = g.op("Concat", [g.dim(token_ids, 0), g.dim(token_ids, 1)], axis=0)
        cross_mask = g.op(
            "Expand", [cross_mask, g.op("Concat", [batch_and_length, g.dim(encoder_padding_mask, 1)], axis=0)]
        )
        for layer_type in masks:
            self_mask = g.op(
                "Expand",
                [masks[layer_type], g.op("Concat", [batch_and_length, g.const([max_decode_length])], axis=0)],
            )
            masks[layer_type] = g.op("Concat", [self_mask, cross_mask], axis=-1)

    for index, (layer, layer_type) in enumerate(zip(weights["decoder"], config["decoder_layer_types"])):
        x, (key_cache, value_cache) = graph.transformer_layer(
            g,
            x,
            layer,
            f"decoder.layer_{index}",
            config,
            masks[layer_type],
            ropes[layer_type],
            cache=(*caches[index], start),
            cross_key_value=cross[index],
            cross_mask=cross_mask,
        )
        g.output(f"present_key_{index}", key_cache, g.activation, cache_shape)
        g.output(f"present_value_{index}", value_cache, g.activation, cache_shape)
    epsilon = config["layer_norm_epsilon"]
    x = graph.rms_norm(g, x, weights["decoder_final_norm"], "decoder.final_norm", epsilon, keep_float32=True)
    logits = graph.logits(g, x, table, config["final_logit_soft_cap"])
    g.output("logits", logits, "float32", ["batch", "decoder_length", config["vocabulary_size"]])
    return g


def _l2_normalize(g, x):
    """`x / max(||x||, 1e-12)` over the last axis."""
    norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)])
    return g.op("Div", [x, g.op("Max", [norm, g.const(1e-12, "float32")])])


def embedder_graph(weights, config, pooling="mean", normalize=True, precision=None):
    """Pooled encoder output (and image-only vectors), as `T5Gemma2Embedder` / `T5GemmaEmbedder`; float32 out."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"`pooling` must be one of {POOLING_MODES}; got {pooling!r}.")
    g = GraphBuilder(f"{config['family']}_embedder", precision, {"pooling": pooling, "normalize": normalize})
    token_ids, padding_mask, images = _encoder_inputs(g, config)
    hidden, image_features = _encode(g, weights, config, token_ids, padding_mask, images)
    mask = g.op("Cast", [padding_mask], to=graph.TensorProto.FLOAT)
    if pooling == "mean":
        weight = g.op("Unsqueeze", [mask, g.const([-1])])
        total = g.op("ReduceSum", [g.op("Mul", [hidden, weight]), g.const([1])], keepdims=0)
        count = g.op("Max", [g.op("ReduceSum", [weight, g.const([1])], keepdims=0), g.const(1.0, "float32")])
        pooled = g.op("Div", [total, count])
    else:
        if pooling == "first":
            index = g.op("Mul", [g.op("Cast", [padding_mask], to=graph.TensorProto.INT64), g.const(0)])
            index = g.op("Slice", [index, g.const([0]), g.const([1]), g.const([1])])
        else:
            # The largest position holding a real token (left or right padding).
            positions = g.op("Mul", [g.arange(g.dim(token_ids, 1)), padding_mask])
            index = g.op("ArgMax", [positions], axis=1, keepdims=1)
        index = g.op(
            "Expand",
            [
                g.op("Unsqueeze", [index, g.const([-1])]),
                g.op("Concat", [g.dim(hidden, 0), g.const([1]), g.dim(hidden, 2)], axis=0),
            ],
        )
        pooled = g.op("Squeeze", [g.op("GatherElements", [hidden, index], axis=1), g.const([1])])
    if normalize:
        pooled = _l2_normalize(g, pooled)
    width = config["encoder"]["hidden_dim"]
    g.output("embedding", pooled, "float32", ["batch", width])
    if images is not None:
        # Every image has as many tokens, so this is also the mean of the images' means.
        image_vector = g.op("ReduceMean", [image_features], axes=[1], keepdims=0)
        if normalize:
            image_vector = _l2_normalize(g, image_vector)
        g.output("image_embedding", image_vector, "float32", ["batch", width])
    return g


# === Folder ===


def _special_token_ids(tokenizer):
    """The ids the runtime needs; the image pieces are None where the vocabulary has none (the first family)."""
    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.start_token_id,
        "eos": tokenizer.end_token_id,
        "start_of_image": getattr(tokenizer, "start_of_image_token_id", None),
        "end_of_image": getattr(tokenizer, "end_of_image_token_id", None),
        "image_placeholder": getattr(tokenizer, "image_placeholder_token_id", None),
    }


def _listify(value):
    return np.asarray(value).tolist() if value is not None else None


_EXPORT_FILES = {CONFIG_FILE, FILES["tokenizer"]}.union(
    *(precision_files(precision).values() for precision in PRECISIONS)
)


def _is_export_file(name):
    return name in _EXPORT_FILES


def _check_output(output):
    """Refuses a file, or a non-empty folder that holds no earlier export; says whether one is replaced."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"The export output {output} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not (output / CONFIG_FILE).exists():
        raise ValueError(
            f"The export output {output} is a non-empty folder that holds no previous ONNX export "
            f"({CONFIG_FILE}); give a new or empty folder so that no other file is overwritten."
        )
    return (output / CONFIG_FILE).exists()


def export_onnx(
    seq_2_seq_lm, output, max_decode_length=None, quantize=None, pooling="mean", normalize=True, precision=None
):
    """Writes `seq_2_seq_lm` as ONNX graphs, tokenizer and settings to the folder `output`.

    Any `T5Gemma2Seq2SeqLM` or `T5GemmaSeq2SeqLM` (the first family:
    separate cross-attention blocks, soft-capped attention and final logits,
    the encoder's own table, encoder and decoder widths that may differ)
    exports: a preset, a fine-tuned model, a model with LoRA adapters
    (merged into the weights). The settings' `family` says which. Weights
    that Keras has quantized (`quantize("int8")`, `"int4"`) are refused:
    export the float model at the precision wanted. Weights are read in float32
    whatever the Keras dtype, then stored at each precision asked for.

    Precisions (one graph set each, sharing the tokenizer and settings):

    - `fp32`: float32 weights and activations (`encoder.onnx`, ...).
    - `fp16`: float16 weights, matmuls, GELU, RoPE and key/value caches; the
      residual stream, RMSNorm/LayerNorm, attention logits and softmax, the
      embedding scaling and the final logits (and soft cap) stay float32,
      where float16 would overflow (`*_fp16.onnx`).
    - `int8`: weight-only int8 in blocks of up to 128 (`MatMulNBits`),
      float32 activations; the embedding table int8 (`Gather`).
    - `q4`: weight-only 4-bit, blocks of 32 along the input axis,
      symmetric (no zero points; each block's scale is its
      largest-magnitude weight / -8), onnxruntime's `MatMulNBits`, float32
      activations; the tied embedding table 4-bit too (`GatherBlockQuantized`
      for the lookup, `MatMulNBits` for the logits over the same codes).
    - `q4f16`: the 4-bit weights of `q4` with float16 activations and scales,
      float32 kept where `fp16` keeps it.

    Norm scales, biases, the vision position embeddings and the
    end-of-image embedding stay float32 in every precision. `fp16` and
    `q4f16` are for accelerators (WebGPU, CUDA); on x86 CPUs onnxruntime's
    float16 matmuls are slower than float32.

    Args:
        seq_2_seq_lm: a `T5Gemma2Seq2SeqLM` or `T5GemmaSeq2SeqLM`. Without a preprocessor only the
            graphs and settings are written (no tokenizer); the runtime then
            takes token ids.
        output: folder to write; created if missing. A non-empty folder is
            only accepted if it holds an earlier export (whose files are
            replaced).
        max_decode_length: int, the static self-attention cache length: the
            longest decoder sequence (`<bos>` + generated tokens) the graphs
            take. Defaults to the preprocessor's `decoder_sequence_length`.
        quantize: `None` or `"int8"`, the earlier spelling of
            `precision="int8"`.
        pooling, normalize: the embedder's pooling (`"mean"`, `"first"`,
            `"last"`) and L2 normalisation, as in `T5Gemma2Embedder`.
        precision: one of `PRECISIONS`, a list of them or a comma-separated
            string (`"fp32,q4"`); default `"fp32"`. The runtime picks one
            with `OnnxSeq2SeqLM(folder, precision=...)`; its default is fp32
            when exported, else the first listed.

    Returns:
        dict: the settings written to `t5gemma2_onnx.json`, with
        `export_seconds`.
    """
    started = time.perf_counter()
    backbone = seq_2_seq_lm.backbone
    if backbone.decoder is None:
        raise ValueError(
            "The backbone has no decoder (`encoder_only=True`); export a T5Gemma2Seq2SeqLM or T5GemmaSeq2SeqLM."
        )
    preprocessor = seq_2_seq_lm.preprocessor
    if max_decode_length is None:
        if preprocessor is None:
            raise ValueError("Pass `max_decode_length`: the model has no preprocessor to take it from.")
        max_decode_length = preprocessor.decoder_sequence_length
    if not isinstance(max_decode_length, int) or max_decode_length < 1:
        raise ValueError(f"`max_decode_length` must be a positive int; got {max_decode_length!r}.")
    if pooling not in POOLING_MODES:
        raise ValueError(f"`pooling` must be one of {POOLING_MODES}; got {pooling!r}.")
    precisions = parse_precisions(precision, quantize)
    replaces_export = _check_output(output)
    # Written into a temporary folder beside `output`, then renamed into place: an interrupted export leaves
    # the earlier one (or nothing); the user's other files in the folder stay.
    with atomic_folder(output, owns=_is_export_file, overwrite=replaces_export, what="export output") as folder:
        settings = _write_export(seq_2_seq_lm, Path(folder), max_decode_length, precisions, pooling, normalize)
    settings["export_seconds"] = time.perf_counter() - started
    return settings


def _write_graph_set(output, weights, config, max_decode_length, precision, pooling, normalize):
    """One precision's three graphs and their weights file; returns its entry of `settings["precisions"]`."""
    files = precision_files(precision)
    with graph.WeightsFile(output / files["weights"]) as weights_file:
        for name, build in (
            ("encoder", lambda: encoder_graph(weights, config, precision)),
            ("decoder", lambda: decoder_graph(weights, config, max_decode_length, precision)),
            ("embedder", lambda: embedder_graph(weights, config, pooling, normalize, precision)),
        ):
            build().save(output / files[name], weights_file)
    weight_format, activations = graph.PRECISIONS[precision]
    entry = {
        "files": files,
        "weights": weight_format,
        "activations": activations,
        "bytes": sum((output / file).stat().st_size for file in files.values()),
    }
    if weight_format == "q4":
        entry["block_size"] = graph.Q4_BLOCK_SIZE
        entry["zero_points"] = None
        entry["accuracy_level"] = graph.Q4_ACCURACY_LEVEL
    return entry


def _write_export(seq_2_seq_lm, output, max_decode_length, precisions, pooling, normalize):
    """Writes the graphs, weights, tokenizer and settings into the folder `output`; returns the settings."""
    backbone = seq_2_seq_lm.backbone
    preprocessor = seq_2_seq_lm.preprocessor
    config = model_config(backbone)
    weights = model_weights(backbone)
    sets = {
        precision: _write_graph_set(output, weights, config, max_decode_length, precision, pooling, normalize)
        for precision in precisions
    }
    default = "fp32" if "fp32" in sets else precisions[0]

    settings = {
        "format": "keras_t5gemma.onnx",
        "format_version": FORMAT_VERSION,
        "opset": graph.OPSET,
        "precisions": sets,
        "default_precision": default,
        # The default graph set under the version 1 keys, for earlier runtimes.
        "quantization": {"fp32": None}.get(default, default),
        "files": dict(sets[default]["files"]),
        "max_decode_length": max_decode_length,
        "family": config["family"],
        "cross_attention": config["cross_attention"],
        "vocabulary_size": config["vocabulary_size"],
        # The encoder's width: the encoder output's and the embeddings'.
        "hidden_dim": config["encoder"]["hidden_dim"],
        "decoder_hidden_dim": config["decoder"]["hidden_dim"],
        "num_decoder_layers": config["num_decoder_layers"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "eoi_token_id": config["eoi_token_id"],
        "image_token_id": config["image_token_id"],
        "vision": config["vision"] is not None,
        "mm_tokens_per_image": None if config["vision"] is None else config["vision"]["mm_tokens_per_image"],
        "image_size": None if config["vision"] is None else config["vision"]["image_size"],
        "embedder": {"pooling": pooling, "normalize": normalize},
        "tokenizer": None,
        "prompt": None,
        "image_converter": None,
    }
    if preprocessor is not None:
        tokenizer = preprocessor.tokenizer
        (output / FILES["tokenizer"]).write_bytes(tokenizer.proto)
        settings["files"]["tokenizer"] = FILES["tokenizer"]
        settings["tokenizer"] = {"special_token_ids": _special_token_ids(tokenizer)}
        settings["prompt"] = {
            "add_start_token": preprocessor.add_start_token,
            "add_end_token": preprocessor.add_end_token,
            "encoder_sequence_length": preprocessor.encoder_sequence_length,
            # T5Gemma 2's preprocessor turns each `<start_of_image>` into an image block; the first
            # family's reads it as plain text.
            "image_markers": config["family"] == "t5gemma2",
        }
        converter = preprocessor.image_converter
        if converter is not None and config["vision"] is not None:
            settings["image_converter"] = {
                "image_size": _listify(converter.image_size),
                "scale": _listify(converter.scale),
                "offset": _listify(converter.offset),
                "resize": "Pillow bilinear (antialiased), aspect ratio not kept",
            }
    (output / CONFIG_FILE).write_text(json.dumps(settings, indent=2))
    return settings
