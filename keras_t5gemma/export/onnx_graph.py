"""A small ONNX graph builder and the T5Gemma computations (both families) written with it.

One function per concept, mirroring `keras_t5gemma/layers`: `rms_norm`,
`rotary`, `attention_mask`, `grouped_attention`, `feedforward`,
`transformer_layer`, `token_embedding`, `vision_tower`, `image_merge`. The
encoder, decoder and embedder graphs (`keras_t5gemma/export/onnx.py`) are
assembled from them with different masks and inputs; the two families differ
by data (query/key norms or none, merged or separate cross-attention, one
tied table or the encoder's own, an end-of-image vector or none).

The builder imports only numpy and onnx; weights come in as numpy arrays.
Each graph is built at one precision (`PRECISIONS`): how matmul weights and
the embedding table are stored, and the activations' dtype. In float16
graphs (`fp16`, `q4f16`) the residual stream, every norm (RMSNorm and
LayerNorm, computed on float32 inputs), the attention logits and softmax,
the embedding lookup's scaling and the final logits (with their soft cap)
stay float32: Gemma's hidden states and attention logits can pass float16's
65504, and a norm's mean of squares overflows long before them. Matmuls,
GELU, RoPE and the key/value caches are float16.
Shape letters as in `keras_t5gemma/layers/attention.py`: B batch, T queries,
S keys, N query heads, K key/value heads, G = N // K, H head size, D width.
"""

import collections
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

OPSET = 17
# Precision -> (how matmul weights and the embedding table are stored, activations' dtype).
PRECISIONS = {
    "fp32": ("float32", "float32"),
    "fp16": ("float16", "float16"),
    "int8": ("int8", "float32"),
    "q4": ("q4", "float32"),
    "q4f16": ("q4", "float16"),
}
# `MatMulNBits` (weight-only 8- and 4-bit matmuls) and `GatherBlockQuantized` live in onnxruntime's domain.
MICROSOFT_DOMAIN = "com.microsoft"
# As `keras_t5gemma.layers.masks.MASKED_LOGIT`: finite, so a fully
# masked row gives a uniform softmax instead of NaN.
MASKED_LOGIT = -1e30
# Weight-only int8 stores `uint8 = round(w / scale) + 128` per block of the
# input axis; the largest block size dividing the input width is used.
INT8_BLOCK_SIZES = (128, 64, 32, 16)
INT8_ZERO_POINT = 128
# `MatMulNBits` computes with int8 activations (quantized per block as it
# runs): onnxruntime's CPU kernel for 8-bit weights is fast only at this level
# (at level 0, float32 activations, it dequantizes the whole weight per call:
# 25x slower than float32 on a 640 x 65536 matmul, where level 4 is 3.5x faster).
INT8_ACCURACY_LEVEL = 4
# 4-bit weights: blocks of 32 along the input axis (a matmul's K, the table's
# D; an input width that 32 does not divide is padded with zeros), symmetric
# without zero points (onnxruntime's default zero point 8 of unsigned codes):
# each block's scale is its largest-magnitude weight over -8, so that weight
# is the code -8 exactly and the 16 codes -8..7 are all used. Scales are in
# the activations' dtype (`MatMulNBits` requires it).
Q4_BLOCK_SIZE = 32
Q4_ZERO_POINT = 8
# As `INT8_ACCURACY_LEVEL`: int8 activations inside `MatMulNBits`, 2.3x
# (batch 1) to 6.7x (batch 8) faster than level 0 on a 640 x 16384 4-bit
# matmul on this CPU, for about 2% relative error per matmul on random data.
Q4_ACCURACY_LEVEL = 4
# Weights larger than this go to the external data file.
EXTERNAL_DATA_THRESHOLD = 1024

# Ops whose outputs are never float, whatever their inputs.
_NOT_FLOAT_OPS = frozenset(("Shape", "Equal", "Less", "Greater", "Not", "And", "Or", "ArgMax"))

_ONNX_TYPES = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("bool"): TensorProto.BOOL,
    np.dtype("uint8"): TensorProto.UINT8,
}


def int8_block_size(input_width):
    """The int8 block size for a matmul over `input_width`, or None (kept float32)."""
    for size in INT8_BLOCK_SIZES:
        if input_width % size == 0:
            return size
    return None


def quantize_int8_rows(matrix, block_size):
    """Symmetric per-block int8 of the rows of `matrix` `(N, K)`.

    Returns `(codes uint8 (N, K // block_size, block_size), scales float32
    (N, K // block_size))`, with `matrix ~= (codes - 128) * scales`.
    """
    rows, width = matrix.shape
    codes = np.empty((rows, width // block_size, block_size), np.uint8)
    scales = np.empty((rows, width // block_size), np.float32)
    # In slices of rows, so that the temporaries stay small beside a 262144-row table.
    step = max(1, 2**22 // width)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        blocks = np.asarray(matrix[part], np.float32).reshape(-1, width // block_size, block_size)
        largest = np.abs(blocks).max(axis=-1) / 127.0
        scales[part] = np.where(largest == 0, 1.0, largest)
        codes[part] = np.clip(np.round(blocks / scales[part][..., None]), -127, 127) + INT8_ZERO_POINT
    return codes, scales


def quantize_q4_rows(matrix, block_size=Q4_BLOCK_SIZE):
    """Symmetric per-block 4-bit codes of the rows of `matrix` `(N, K)`, as `MatMulNBits` reads them.

    Returns `(packed uint8 (N, ceil(K / block_size), block_size // 2),
    scales float32 (N, ceil(K / block_size)))`: two codes a byte, the even
    element in the low nibble; `matrix ~= (codes - 8) * scales` (zero-padded
    to whole blocks).
    """
    rows, width = matrix.shape
    blocks_per_row = -(-width // block_size)
    packed = np.empty((rows, blocks_per_row, block_size // 2), np.uint8)
    scales = np.empty((rows, blocks_per_row), np.float32)
    # In slices of rows, so that the temporaries stay small beside a 262144-row table.
    step = max(1, 2**22 // (blocks_per_row * block_size))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        blocks = np.zeros((len(matrix[part]), blocks_per_row * block_size), np.float32)
        blocks[:, :width] = matrix[part]
        blocks = blocks.reshape(-1, blocks_per_row, block_size)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        scales[part] = np.where(extreme == 0, 1.0, extreme / -8.0)
        codes = (np.clip(np.round(blocks / scales[part][..., None]), -8, 7) + Q4_ZERO_POINT).astype(np.uint8)
        packed[part] = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scales


def dequantize_q4_rows(packed, scales, width):
    """The float32 `(N, width)` matrix that `quantize_q4_rows`' codes stand for."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    values = (codes.astype(np.float32) - Q4_ZERO_POINT) * np.asarray(scales, np.float32)[..., None]
    return values.reshape(len(packed), -1)[:, :width]


class GraphBuilder:
    """Collects nodes, weights and graph inputs/outputs; `op` returns output names.

    Args:
        name: the graph's name.
        precision: one of `PRECISIONS` (None: `"fp32"`).
        metadata: optional dict written to the model's metadata.

    In a float16 graph the builder follows which tensors are float32 (graph
    inputs, casts to float32 and what is computed from them), so that
    `to_float32` and `to_activation` add a `Cast` only where the dtype changes.
    """

    def __init__(self, name, precision=None, metadata=None):
        precision = precision or "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {tuple(PRECISIONS)}; got {precision!r}.")
        self.name = name
        self.precision = precision
        self.weight_format, self.activation = PRECISIONS[precision]
        self.metadata = dict(metadata or {})
        self.nodes = []
        self.weights = {}
        self.inputs = []
        self.outputs = []
        self._counts = collections.Counter()
        self._constants = {}
        self.uses_microsoft_domain = False
        # Tensors known to be float32 in a float16 graph.
        self._float32 = set()

    def _fresh(self, hint):
        self._counts[hint] += 1
        return f"{hint}_{self._counts[hint]}"

    def op(self, op_type, inputs, outputs=1, domain=None, hint=None, **attributes):
        """Adds one node; returns its output name, or a list when `outputs > 1`."""
        names = [self._fresh(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain, **attributes))
        if op_type == "Cast":
            is_float32 = attributes["to"] == TensorProto.FLOAT
        else:
            is_float32 = op_type not in _NOT_FLOAT_OPS and any(name in self._float32 for name in inputs)
        if is_float32:
            self._float32.update(names)
        return names[0] if outputs == 1 else names

    def to_float32(self, x):
        """`x` as float32 (a `Cast` only for a float16 tensor of a float16 graph)."""
        if self.activation == "float32" or x in self._float32:
            return x
        return self.op("Cast", [x], to=TensorProto.FLOAT)

    def to_activation(self, x):
        """`x` in the activations' dtype (a `Cast` only for a float32 tensor of a float16 graph)."""
        if self.activation == "float32" or x not in self._float32:
            return x
        return self.op("Cast", [x], to=TensorProto.FLOAT16)

    def activation_const(self, value):
        """A scalar or small constant in the activations' dtype."""
        return self.const(value, self.activation)

    def weight(self, name, array):
        """A named initializer (added once per name); the array is not copied until it is saved."""
        if name not in self.weights:
            self.weights[name] = np.asarray(array)
        return name

    def const(self, value, dtype="int64"):
        """A small constant, shared between uses."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(self._fresh(f"{self.name}.const"), array)
        return self._constants[key]

    def input(self, name, dtype, shape):
        if np.dtype(dtype) == np.float32:
            self._float32.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPES[np.dtype(dtype)], shape))
        return name

    def output(self, name, value, dtype, shape):
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, _ONNX_TYPES[np.dtype(dtype)], shape))
        return name

    def save(self, path, weights_file):
        """Writes the model to `path`; weights over 1 KiB go to `weights_file`.

        Args:
            path: the `.onnx` file.
            weights_file: a `WeightsFile` in the same folder, shared by the
                graphs of one export: a weight that several graphs use (the
                embedding table, the encoder in the encoder and embedder
                graphs) is stored once.
        """
        initializers = []
        for weight_name, array in self.weights.items():
            array = np.asarray(array)
            if array.nbytes <= EXTERNAL_DATA_THRESHOLD:
                initializers.append(numpy_helper.from_array(np.array(array, order="C"), weight_name))
                continue
            offset = weights_file.write(weight_name, array)
            initializer = TensorProto(
                name=weight_name,
                data_type=_ONNX_TYPES[array.dtype],
                dims=array.shape,
                data_location=TensorProto.EXTERNAL,
            )
            for key, value in (("location", weights_file.location), ("offset", offset), ("length", array.nbytes)):
                entry = initializer.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(initializer)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_microsoft_domain:
            opsets.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="keras_t5gemma")
        # The IR version onnxruntime releases of the last years all read.
        model.ir_version = 8
        for key, value in self.metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save_model(model, str(path))

    # === Shape helpers ===

    def dim(self, x, axis):
        """`x.shape[axis]` as a 1-element int64 tensor."""
        return self.op("Slice", [self.op("Shape", [x]), self.const([axis]), self.const([axis + 1])])

    def reshape(self, x, parts):
        """Reshape to the concatenation of `parts`: ints or 1-element int64 tensors.

        A zero is a zero (`allowzero`), not "keep this axis": batches of no
        images have zero-sized axes.
        """
        pieces = [self.const([part]) if isinstance(part, int) else part for part in parts]
        return self.op("Reshape", [x, self.op("Concat", pieces, axis=0)], allowzero=1)

    def arange(self, length, start=None):
        """`start + [0, 1, ..., length)` int64, `length` a 1-element tensor."""
        end = self.op("Squeeze", [length, self.const([0])])
        positions = self.op("Range", [self.const(0), end, self.const(1)])
        return positions if start is None else self.op("Add", [positions, start])


class WeightsFile:
    """The external data file of an export's graphs; each named weight is written once.

    Weights are written array by array from numpy, so the protobuf never
    holds them (models over 2 GB work, and the export needs little memory
    beyond the model), at page-aligned offsets so that readers may map them.

    Use as a context manager: `with WeightsFile(folder / "weights.data") as weights: graph.save(path, weights)`.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.location = self.path.name
        self.offsets = {}
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "wb")
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def write(self, name, array):
        """The offset of weight `name`, writing `array` unless it was written before."""
        if name not in self.offsets:
            self._file.write(b"\0" * (-self._file.tell() % 4096))
            self.offsets[name] = self._file.tell()
            self._file.write(np.ascontiguousarray(array).data)
        return self.offsets[name]


# === Layers ===


def matmul_nbits(g, x, codes, scales, input_width, output_width, bits, block_size):
    """onnxruntime's `MatMulNBits`: `x @ W.T` for a `(N, K)` weight stored as `bits`-bit block codes."""
    g.uses_microsoft_domain = True
    return g.op(
        "MatMulNBits",
        [x, codes, scales],
        domain=MICROSOFT_DOMAIN,
        K=input_width,
        N=output_width,
        bits=bits,
        accuracy_level=INT8_ACCURACY_LEVEL if bits == 8 else Q4_ACCURACY_LEVEL,
        block_size=block_size,
    )


def linear(g, x, kernel, name, bias=None):
    """`x @ kernel (+ bias)`, `kernel` `(K, N)`, in the activations' dtype; weights as the precision stores them.

    Int8 and 4-bit run as onnxruntime's `MatMulNBits` (weights in symmetric
    blocks of the input axis; see `INT8_ACCURACY_LEVEL`, `Q4_BLOCK_SIZE`).
    An int8 kernel whose input width no block size divides stays float32.
    """
    x = g.to_activation(x)
    input_width, output_width = kernel.shape
    block_size = int8_block_size(input_width) if g.weight_format == "int8" else None
    if g.weight_format == "q4":
        codes, scales = quantize_q4_rows(np.asarray(kernel, np.float32).T)
        scales = g.weight(name + ".scales", scales.reshape(-1).astype(g.activation))
        y = matmul_nbits(g, x, g.weight(name + ".q4", codes), scales, input_width, output_width, 4, Q4_BLOCK_SIZE)
    elif block_size is not None:
        codes, scales = quantize_int8_rows(np.asarray(kernel, np.float32).T, block_size)
        scales = g.weight(name + ".scales", scales.reshape(-1))
        y = matmul_nbits(g, x, g.weight(name + ".int8", codes), scales, input_width, output_width, 8, block_size)
    else:
        dtype = "float16" if g.weight_format == "float16" else "float32"
        y = g.op("MatMul", [x, g.weight(name, np.asarray(kernel).astype(dtype, copy=False))])
    if bias is not None:
        y = g.op("Add", [y, g.weight(name + ".bias", np.asarray(bias).astype(g.activation))])
    return y


def rms_norm(g, x, scale, name, epsilon, keep_float32=False):
    """`x / rms(x) * (1 + scale)` over the last axis, computed in float32.

    Returns float32 if `keep_float32` (what goes into the residual stream),
    else the activations' dtype.
    """
    x = g.to_float32(x)
    mean_square = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
    inverse = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, g.const(epsilon, "float32")])])])
    factor = g.weight(name, (1.0 + scale).astype(np.float32))
    y = g.op("Mul", [g.op("Mul", [x, inverse]), factor])
    return y if keep_float32 else g.to_activation(y)


def layer_norm(g, x, weights, name, epsilon, keep_float32=False):
    """LayerNormalization with `weights["gamma"]`, `weights["beta"]` (SigLIP), computed in float32."""
    gamma = g.weight(name + ".gamma", weights["gamma"].astype(np.float32))
    beta = g.weight(name + ".beta", weights["beta"].astype(np.float32))
    y = g.op("LayerNormalization", [g.to_float32(x), gamma, beta], axis=-1, epsilon=epsilon)
    return y if keep_float32 else g.to_activation(y)


def rotary_tables(g, positions, head_dim, wavelength, scaling_factor):
    """`(cos, sin)`, each `(T, H)`, for int64 `positions` `(T,)`.

    The inverse frequencies are computed as `keras_t5gemma.layers.rotary`
    computes them (float32, divided by the linear scaling factor).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inverse = np.float32(1.0) / np.power(np.float32(wavelength), exponents, dtype=np.float32)
    inverse = (inverse / np.float32(scaling_factor)).astype(np.float32)
    angles = g.op(
        "Mul",
        [
            g.op("Unsqueeze", [g.op("Cast", [positions], to=TensorProto.FLOAT), g.const([1])]),
            g.const(inverse, "float32"),
        ],
    )
    angles = g.op("Concat", [angles, angles], axis=-1)
    return g.op("Cos", [angles]), g.op("Sin", [angles])


def rotary(g, x, cos, sin, head_dim):
    """Rotates `x` `(B, T, N, H)` by `(T, H)` tables, half-split layout."""
    cos = g.op("Unsqueeze", [cos, g.const([1])])
    sin = g.op("Unsqueeze", [sin, g.const([1])])
    half = head_dim // 2
    first = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
    second = g.op("Slice", [x, g.const([half]), g.const([head_dim]), g.const([-1])])
    rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def attention_mask(g, query_positions, key_positions, causal, sliding_window=None, key_padding_mask=None):
    """bool `(1 or B, T, S)`, as `keras_t5gemma.layers.masks.attention_mask`."""
    distance = g.op(
        "Sub", [g.op("Unsqueeze", [query_positions, g.const([1])]), g.op("Unsqueeze", [key_positions, g.const([0])])]
    )

    def below(limit):
        return g.op("Less", [distance, g.const(limit)])

    def above(limit):
        return g.op("Greater", [distance, g.const(limit)])

    if causal:
        allowed = g.op("Not", [below(0)])
        if sliding_window is not None:
            allowed = g.op("And", [allowed, below(sliding_window)])
    elif sliding_window is None:
        allowed = above(-(2**62))
    else:
        # Query i sees j when 0 <= i - j < (w + 1) // 2 or 0 < j - i < w // 2 + 1.
        left = g.op("And", [g.op("Not", [below(0)]), below((sliding_window + 1) // 2)])
        right = g.op("And", [below(0), above(-(sliding_window // 2 + 1))])
        allowed = g.op("Or", [left, right])
    allowed = g.op("Unsqueeze", [allowed, g.const([0])])
    if key_padding_mask is not None:
        allowed = g.op("And", [allowed, padding_mask_for_keys(g, key_padding_mask)])
    return allowed


def padding_mask_for_keys(g, padding_mask):
    """int `(B, S)` padding mask as bool `(B, 1, S)`."""
    return g.op("Unsqueeze", [g.op("Cast", [padding_mask], to=TensorProto.BOOL), g.const([1])])


def grouped_attention(g, query, key, value, mask, num_heads, num_kv_heads, head_dim, scale, soft_cap=None):
    """Softmax attention with query heads grouped over key/value heads.

    Args:
        query: `(B, T, N, H)`; key, value: `(B, S, K, H)`.
        mask: bool broadcastable to `(B, T, S)`, or None.

    Returns:
        `(B, T, N * H)`.
    """
    batch, length = g.dim(query, 0), g.dim(query, 1)
    groups = num_heads // num_kv_heads
    grouped = g.reshape(query, [batch, length, num_kv_heads, groups, head_dim])
    grouped = g.op("Transpose", [grouped], perm=[0, 2, 3, 1, 4])  # (B, K, G, T, H)
    key = g.op("Unsqueeze", [g.op("Transpose", [key], perm=[0, 2, 3, 1]), g.const([2])])  # (B, K, 1, H, S)
    value = g.op("Unsqueeze", [g.op("Transpose", [value], perm=[0, 2, 1, 3]), g.const([2])])  # (B, K, 1, S, H)
    # Logits, soft cap, mask and softmax in float32.
    logits = g.to_float32(g.op("MatMul", [grouped, key]))
    logits = g.op("Mul", [logits, g.const(scale, "float32")])  # (B, K, G, T, S)
    if soft_cap is not None:
        capped = g.op("Tanh", [g.op("Div", [logits, g.const(soft_cap, "float32")])])
        logits = g.op("Mul", [capped, g.const(soft_cap, "float32")])
    if mask is not None:
        mask = g.op("Unsqueeze", [mask, g.const([1, 2])])
        logits = g.op("Where", [mask, logits, g.const(MASKED_LOGIT, "float32")])
    probabilities = g.to_activation(g.op("Softmax", [logits], axis=-1))
    attended = g.op("MatMul", [probabilities, value])  # (B, K, G, T, H)
    attended = g.op("Transpose", [attended], perm=[0, 3, 1, 2, 4])
    return g.reshape(attended, [batch, length, num_heads * head_dim])


def heads(g, x, count, head_dim):
    """`(B, T, count * H)` to `(B, T, count, H)`."""
    return g.reshape(x, [g.dim(x, 0), g.dim(x, 1), count, head_dim])


def key_value(g, x, weights, name, config):
    """Keys `(B, S, K, H)` (k-normed when the model norms them, no RoPE) and values of `x`, as `Attention.key_value`.

    `x` may be wider or narrower than the queries' stream (the first
    family's cross-attention projects from the encoder's width).
    """
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    key = heads(g, linear(g, x, weights["key"], name + ".key"), kv_heads, head_dim)
    if config["use_query_key_norm"]:
        key = rms_norm(g, key, weights["key_norm"], name + ".key_norm", config["layer_norm_epsilon"])
    value = heads(g, linear(g, x, weights["value"], name + ".value"), kv_heads, head_dim)
    return key, value


def query_heads(g, x, weights, name, config):
    """Queries `(B, T, N, H)` of `x` (q-normed when the model norms them, no RoPE)."""
    query = heads(g, linear(g, x, weights["query"], name + ".query"), config["num_heads"], config["head_dim"])
    if config["use_query_key_norm"]:
        query = rms_norm(g, query, weights["query_norm"], name + ".query_norm", config["layer_norm_epsilon"])
    return query


def attention_output(g, query, key, value, mask, weights, name, config):
    """Grouped attention of `query` over `key`/`value` with the model's scale and soft cap, then the output matmul."""
    attended = grouped_attention(
        g,
        query,
        key,
        value,
        mask,
        config["num_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["query_scale"],
        config["attention_soft_cap"],
    )
    return linear(g, attended, weights["output"], name + ".output")


def feedforward(g, x, weights, name):
    """`down(gelu_tanh(gate(x)) * up(x))`."""
    gate = gelu_tanh(g, linear(g, x, weights["gate"], name + ".gate"))
    return linear(g, g.op("Mul", [gate, linear(g, x, weights["up"], name + ".up")]), weights["down"], name + ".down")


def gelu_tanh(g, x):
    """`0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.activation_const(0.044715)])])
    inner = g.op("Mul", [inner, g.activation_const(np.sqrt(2.0 / np.pi))])
    half = g.op("Mul", [x, g.activation_const(0.5)])
    return g.op("Mul", [half, g.op("Add", [g.op("Tanh", [inner]), g.activation_const(1.0)])])


def transformer_layer(g, x, weights, name, config, mask, rope, cache=None, cross_key_value=None, cross_mask=None):
    """One Gemma 2 or Gemma 3 layer, as `keras_t5gemma.layers.transformer.TransformerLayer`.

    A decoder layer attends to the encoder's `cross_key_value` in one of two
    ways, as its weights say: T5Gemma 2 appends them after its self keys
    (merged self+cross attention, one softmax, `mask` covering both); the
    first family's layers have a `"cross_attention"` block of their own
    (queries from its pre-norm, its own softmax under `cross_mask`, its
    post-norm) between self-attention and the MLP.

    Args:
        mask: bool over the self keys (then, merged, the cross keys).
        rope: `(cos, sin)` for the positions of `x`.
        cache: optional `(key_cache, value_cache, start)`: `(B, L, K, H)`
            caches and the int64 `(1,)` position of `x`'s first token; the new
            keys/values are written there.
        cross_key_value: optional encoder `(key, value)`, `(B, S, K, H)`.
        cross_mask: bool over the encoder keys, for a separate
            cross-attention block.

    Returns:
        `x` (the residual stream, float32) and, with a cache, the updated
        `(key_cache, value_cache)` (the activations' dtype).
    """
    epsilon = config["layer_norm_epsilon"]
    head_dim = config["head_dim"]
    attention = weights["attention"]
    separate = "cross_attention" in weights
    normed = rms_norm(g, x, weights["pre_attention_norm"], name + ".pre_attention_norm", epsilon)
    query = query_heads(g, normed, attention, name + ".attention", config)
    key, value = key_value(g, normed, attention, name + ".attention", config)
    query, key = rotary(g, query, *rope, head_dim), rotary(g, key, *rope, head_dim)
    new_cache = None
    if cache is not None:
        key_cache, value_cache, start = cache
        end = g.op("Add", [start, g.dim(x, 1)])
        big = g.const([2**62])

        def write(buffer, update):
            before = g.op("Slice", [buffer, g.const([0]), start, g.const([1])])
            after = g.op("Slice", [buffer, end, big, g.const([1])])
            return g.op("Concat", [before, update, after], axis=1)

        key, value = write(key_cache, key), write(value_cache, value)
        new_cache = (key, value)
    if cross_key_value is not None and not separate:
        key = g.op("Concat", [key, cross_key_value[0]], axis=1)
        value = g.op("Concat", [value, cross_key_value[1]], axis=1)
    attended = attention_output(g, query, key, value, mask, attention, name + ".attention", config)
    post = rms_norm(g, attended, weights["post_attention_norm"], name + ".post_attention_norm", epsilon, True)
    x = g.op("Add", [x, post])
    if separate:
        cross = weights["cross_attention"]
        normed = rms_norm(g, x, weights["pre_cross_attention_norm"], name + ".pre_cross_attention_norm", epsilon)
        query = query_heads(g, normed, cross, name + ".cross_attention", config)
        attended = attention_output(g, query, *cross_key_value, cross_mask, cross, name + ".cross_attention", config)
        post_norm = weights["post_cross_attention_norm"]
        x = g.op("Add", [x, rms_norm(g, attended, post_norm, name + ".post_cross_attention_norm", epsilon, True)])
    normed = rms_norm(g, x, weights["pre_feedforward_norm"], name + ".pre_feedforward_norm", epsilon)
    fed = feedforward(g, normed, weights["feedforward"], name + ".feedforward")
    post = rms_norm(g, fed, weights["post_feedforward_norm"], name + ".post_feedforward_norm", epsilon, True)
    x = g.op("Add", [x, post])
    return x if cache is None else (x, new_cache)


def stack_masks_and_ropes(g, config, layer_types, query_positions, key_positions, causal, key_padding_mask=None):
    """Per layer type: the mask and RoPE tables, built once and shared by the layers."""
    masks, ropes = {}, {}
    for layer_type in sorted(set(layer_types)):
        window = config["sliding_window"] if layer_type == "sliding_attention" else None
        masks[layer_type] = attention_mask(g, query_positions, key_positions, causal, window, key_padding_mask)
        wavelength, scaling = config["rope"][layer_type]
        tables = rotary_tables(g, query_positions, config["head_dim"], wavelength, scaling)
        ropes[layer_type] = tuple(g.to_activation(table) for table in tables)
    return masks, ropes


# === Embeddings and images ===


def embedding_table(g, table, name):
    """Registers the tied table; returns a handle for `token_embedding` and `logits`.

    Float32 / float16: one `(V, D)` initializer. Int8: one uint8
    `(V, D / b, b)` code tensor and `(V, D / b)` scales, read by `Gather` for
    embeddings and by `MatMulNBits` as the output projection (its weight
    layout is `(N, K)`, which is the table's). 4-bit: one packed uint8
    `(V, D / 2)` code tensor and `(V, D / 32)` scales in the activations'
    dtype, in the rank-2 layout every `GatherBlockQuantized` kernel takes
    (`quantize_axis=1`), read by it for embeddings and, reshaped to
    `(V, D / 32, 16)` (folded when the session opens), by `MatMulNBits` for
    the logits: the table is stored once, in 4 bits.
    """
    vocabulary_size, hidden_dim = table.shape
    if g.weight_format == "q4":
        if hidden_dim % Q4_BLOCK_SIZE:
            raise ValueError(f"4-bit tables need a width divisible by {Q4_BLOCK_SIZE}; got {hidden_dim}.")
        codes, scales = quantize_q4_rows(np.asarray(table, np.float32))
        return {
            "q4": g.weight(name + ".q4", codes.reshape(vocabulary_size, hidden_dim // 2)),
            "scales": g.weight(name + ".scales", scales.astype(g.activation)),
            "shape": table.shape,
        }
    block_size = int8_block_size(hidden_dim) if g.weight_format == "int8" else None
    if block_size is None:
        dtype = "float16" if g.weight_format == "float16" else "float32"
        return {"table": g.weight(name, np.asarray(table).astype(dtype, copy=False)), "shape": table.shape}
    codes, scales = quantize_int8_rows(table, block_size)
    return {
        "codes": g.weight(name + ".int8", codes),
        "scales": g.weight(name + ".scales", scales),
        "block_size": block_size,
        "shape": table.shape,
    }


def token_embedding(g, token_ids, table, eoi_embedding, eoi_token_id, name):
    """`(B, T)` ids to `(B, T, D)`: rows times sqrt(D); end-of-image rows replaced by `eoi_embedding`.

    `eoi_embedding` None (the first family): no row is replaced.
    """
    vocabulary_size, hidden_dim = table["shape"]
    if "table" in table:
        rows = g.to_float32(g.op("Gather", [table["table"], token_ids], axis=0))
    elif "q4" in table:
        g.uses_microsoft_domain = True
        rows = g.op(
            "GatherBlockQuantized",
            [table["q4"], token_ids, table["scales"]],
            domain=MICROSOFT_DOMAIN,
            bits=4,
            block_size=Q4_BLOCK_SIZE,
            gather_axis=0,
            quantize_axis=1,
        )
        rows = g.to_float32(rows)
    else:
        codes = g.op("Cast", [g.op("Gather", [table["codes"], token_ids], axis=0)], to=TensorProto.FLOAT)
        codes = g.op("Sub", [codes, g.const(float(INT8_ZERO_POINT), "float32")])
        scales = g.op("Unsqueeze", [g.op("Gather", [table["scales"], token_ids], axis=0), g.const([-1])])
        rows = g.reshape(g.op("Mul", [codes, scales]), [g.dim(token_ids, 0), g.dim(token_ids, 1), hidden_dim])
    # The scale is rounded to float32 first, as the Keras layer does.
    rows = g.op("Mul", [rows, g.const(np.float32(np.sqrt(hidden_dim)), "float32")])
    if eoi_embedding is None:
        return rows
    is_eoi = g.op("Unsqueeze", [g.op("Equal", [token_ids, g.const(eoi_token_id)]), g.const([-1])])
    return g.op("Where", [is_eoi, g.weight(name + ".eoi_embedding", eoi_embedding.astype(np.float32)), rows])


def logits(g, hidden, table, soft_cap=None):
    """`(B, T, D)` to float32 `(B, T, V)` through the tied table (the soft cap in float32)."""
    vocabulary_size, hidden_dim = table["shape"]
    hidden = g.to_activation(hidden)
    if "table" in table:
        y = g.op("MatMul", [hidden, g.op("Transpose", [table["table"]], perm=[1, 0])])
    elif "q4" in table:
        blocks = hidden_dim // Q4_BLOCK_SIZE
        codes = g.op("Reshape", [table["q4"], g.const([vocabulary_size, blocks, Q4_BLOCK_SIZE // 2])])
        scales = g.op("Reshape", [table["scales"], g.const([-1])])
        y = matmul_nbits(g, hidden, codes, scales, hidden_dim, vocabulary_size, 4, Q4_BLOCK_SIZE)
    else:
        scales = g.op("Reshape", [table["scales"], g.const([-1])])
        y = matmul_nbits(g, hidden, table["codes"], scales, hidden_dim, vocabulary_size, 8, table["block_size"])
    y = g.to_float32(y)
    if soft_cap is not None:
        y = g.op("Mul", [g.op("Tanh", [g.op("Div", [y, g.const(soft_cap, "float32")])]), g.const(soft_cap, "float32")])
    return y


def vision_tower(g, images, weights, config):
    """`(M, H, W, 3)` converted images to `(M, mm_tokens_per_image, D)` soft tokens (activations' dtype).

    SigLIP: patches (the strided convolution written as a matmul over
    flattened `(row, column, channel)` patches), position embeddings,
    pre-LayerNorm layers, a final LayerNorm; then the projector: average
    pooling of the patch grid, RMSNorm and a matmul to the text width.
    """
    patch, side = config["patch_size"], config["patches_per_side"]
    hidden, num_heads, epsilon = config["hidden_dim"], config["num_heads"], config["layer_norm_epsilon"]
    head_dim = hidden // num_heads
    count = g.dim(images, 0)
    x = g.reshape(images, [count, side, patch, side, patch, 3])
    x = g.op("Transpose", [x], perm=[0, 1, 3, 2, 4, 5])
    x = g.reshape(x, [count, side * side, patch * patch * 3])
    kernel = weights["patch_kernel"].reshape(patch * patch * 3, hidden)
    x = g.to_float32(linear(g, x, kernel, "vision.patch_embedding", weights["patch_bias"]))
    x = g.op("Add", [x, g.weight("vision.position_embedding", weights["position_embedding"].astype(np.float32))])
    for index, layer in enumerate(weights["layers"]):
        name = f"vision.layer_{index}"
        attention = layer["attention"]
        normed = layer_norm(g, x, layer["attention_norm"], name + ".attention_norm", epsilon)

        def project(part):
            return heads(
                g,
                linear(g, normed, attention[part], f"{name}.attention.{part}", attention[part + "_bias"]),
                num_heads,
                head_dim,
            )

        attended = grouped_attention(
            g,
            project("query"),
            project("key"),
            project("value"),
            None,
            num_heads,
            num_heads,
            head_dim,
            head_dim**-0.5,
        )
        attended = linear(g, attended, attention["output"], name + ".attention.output", attention["output_bias"])
        x = g.op("Add", [x, g.to_float32(attended)])
        normed = layer_norm(g, x, layer["feedforward_norm"], name + ".feedforward_norm", epsilon)
        feedforward = layer["feedforward"]
        up = gelu_tanh(g, linear(g, normed, feedforward["up"], name + ".feedforward.up", feedforward["up_bias"]))
        down = linear(g, up, feedforward["down"], name + ".feedforward.down", feedforward["down_bias"])
        x = g.op("Add", [x, g.to_float32(down)])
    x = layer_norm(g, x, weights["final_norm"], "vision.final_norm", epsilon, keep_float32=True)
    tokens_per_side = config["tokens_per_side"]
    pool = side // tokens_per_side
    grid = g.reshape(x, [count, tokens_per_side, pool, tokens_per_side, pool, hidden])
    pooled = g.op("ReduceMean", [grid], axes=[2, 4], keepdims=0)
    pooled = g.reshape(pooled, [count, tokens_per_side * tokens_per_side, hidden])
    pooled = rms_norm(g, pooled, weights["projector_norm"], "vision.projector_norm", epsilon)
    return linear(g, pooled, weights["projection"], "vision.projection")


def image_merge(g, embeddings, token_ids, image_features, image_token_id):
    """Placeholders take the sample's image tokens in order, as `layers.vision.ImageMerge`.

    Args:
        embeddings: `(B, S, D)`; token_ids: `(B, S)`; image_features: `(B, M, D)`.
    """
    is_image = g.op("Equal", [token_ids, g.const(image_token_id)])
    image_rank = g.op("Sub", [g.op("CumSum", [g.op("Cast", [is_image], to=TensorProto.INT64), g.const(1)]), g.const(1)])
    length = g.dim(token_ids, 1)
    positions = g.arange(length)
    source_index = g.op("Where", [is_image, g.op("Add", [image_rank, length]), positions])
    source = g.op("Concat", [embeddings, image_features], axis=1)
    index = g.op("Expand", [g.op("Unsqueeze", [source_index, g.const([-1])]), g.op("Shape", [embeddings])])
    return g.op("GatherElements", [source, index], axis=1)
