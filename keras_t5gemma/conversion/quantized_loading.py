"""Loading a checkpoint straight into int8 or int4: no float copy of the model is ever held.

`layers_built_quantized` gives the layers that `quantize` converts (the
projections and the embedding table, `models.quantization.quantizable`) a
quantized dtype policy as they are built, as Keras builds a reloaded
quantized model: they get their int8 (or packed int4) variables and scales
and never a float kernel. `quantized_values` then fills them from each float checkpoint tensor
as it is read, with the arithmetic of Keras' own `layer.quantize` (its
quantizers, on the tensor alone; the abs-max one jitted on JAX), so that the
model equals one loaded in float and quantized afterwards, bit for bit.
"""

import contextlib
import functools
import math
import threading
import weakref

import keras
import ml_dtypes
import numpy as np

from keras_t5gemma.models.quantization import quantizable
from keras_t5gemma.utils.loading import fill_from_values
from keras_t5gemma.utils.loading import numpy_dtype
from keras_t5gemma.utils.preset_utils import check_quantize_mode

# Embedding tables above this size are quantized in blocks of rows (Keras
# scales each row on its own), so that the quantizer's float temporaries
# (several copies of its input) stay small next to the table.
_BLOCK_BYTES = 8 << 20


def _policy_mode(mode):
    """The dtype policy mode that `quantize(mode)` without a config gives a layer.

    Keras' `quantize("int4")` uses `Int4QuantizationConfig()`: blocks of 128
    inputs, each with a scale and a zero point ("int4/128").
    """
    if mode == "int4":
        return f"int4/{keras.quantizers.Int4QuantizationConfig().block_size}"
    return mode


_building = threading.local()
_patch_lock = threading.Lock()


def _quantized_when_built(build):
    """Keras' `build` of a layer class, giving the layer its quantized policy first where `quantize` would."""

    @functools.wraps(build)  # Keras passes `build` the arguments its signature names
    def build_quantized_first(layer, *args, **kwargs):
        mode = getattr(_building, "mode", None)
        if mode is not None and _converted_by_quantize(layer):
            # As `layer.quantize(mode)` names it; a layer not built yet only takes the policy.
            layer.dtype_policy = f"{_policy_mode(mode)}_from_{layer.dtype_policy.name}"
        return build(layer, *args, **kwargs)

    build_quantized_first.original = build
    return build_quantized_first


@contextlib.contextmanager
def layers_built_quantized(mode):
    """Inside, each layer `quantize(mode)` would convert is built quantized (this thread only).

    Keras builds a layer whose dtype policy is quantized (as a reloaded
    quantized model does) with its int8 (or packed int4) variables and
    scales and no float kernel. Each `Dense`, `EinsumDense` and `Embedding`
    leaf that `Model.quantize` converts with the default filter gets that
    policy (`"int8_from_bfloat16"`, ...) just before its `build`, when its
    place in the model is known; the model is built once.
    """
    check_quantize_mode(mode)
    with _patch_lock:
        for cls in (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding):
            if not hasattr(cls.__dict__["build"], "original"):
                cls.build = _quantized_when_built(cls.__dict__["build"])
    outer = getattr(_building, "mode", None)
    _building.mode = mode
    try:
        yield
    finally:
        _building.mode = outer


def _converted_by_quantize(layer):
    """Whether `Model.quantize` with the default filter converts `layer` (a leaf layer `quantizable` accepts)."""
    return quantizable(layer) and len(list(layer._flatten_layers())) == 1


class PackedWeight:
    """A 4-bit layer's float weight as a checkpoint fills it: its name, path and float shape.

    Keras' int4 layers store two 4-bit values per byte, and their `kernel`
    (`embeddings`) is computed from that packed variable; a `WeightSpec`
    names this stand-in instead (`float_weight`), and the loader fills its
    layer through `quantized_values` (`quantized_layers` maps it there).
    """

    def __init__(self, layer, name, shape):
        self.layer, self.name, self.shape = layer, name, tuple(shape)
        self.path = f"{layer.path}/{name}"
        self.dtype = layer.variable_dtype


_PACKED = weakref.WeakKeyDictionary()  # layer -> its `PackedWeight`s by name


def float_weight(layer, name="kernel"):
    """What a checkpoint tensor fills for `layer`'s float `name`: the variable, or a 4-bit layer's stand-in."""
    if layer.quantization_mode != "int4":
        return getattr(layer, name)
    if isinstance(layer, keras.layers.Embedding):
        shape = (layer.input_dim, layer.output_dim)
    elif isinstance(layer, keras.layers.EinsumDense):
        shape = layer.original_kernel_shape
    else:
        shape = (layer._kernel.shape[0], layer.units)
    packed = _PACKED.setdefault(layer, {})
    if name not in packed:
        packed[name] = PackedWeight(layer, name, shape)
    return packed[name]


def quantized_layers(model):
    """`{id(variable): layer}` for each quantized variable (int8 or packed int4 kernel or table) of `model`'s layers."""
    owners = {}
    for layer in model._flatten_layers():
        if getattr(layer, "quantization_mode", None) is None:
            continue
        for variable in layer.weights:
            if "int" in keras.backend.standardize_dtype(variable.dtype):
                owners[id(variable)] = layer
        for stand_in in _PACKED.get(layer, {}).values():
            owners[id(stand_in)] = layer
    return owners


def _own_policy(layer):
    """`layer`'s dtype policy, looked up by its path when it holds a `DTypePolicyMap`."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    return policy


# Keras' quantizers' default epsilon (taken when Keras is imported, as their signatures do).
_EPSILON = keras.quantizers.AbsMaxQuantizer().epsilon


@functools.cache
def _compiled():
    """Keras' abs-max quantizer as one jitted function (JAX only), compiled once per shape, dtypes and axes."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("dtype", "axis", "low", "high"))
    def quantize(x, dtype, axis, low, high):
        # In the variable's dtype, as Keras quantizes it (the conversion is fused with the passes below).
        x = x.astype(dtype)
        if x.dtype == jnp.float32:
            rounded = lambda v: v  # noqa: E731  (float32 arithmetic is NumPy's own)
        else:
            # NumPy's (ml_dtypes') 16-bit arithmetic is float32's, rounded to 16 bits after each operation:
            # float32 holds the sum and the product of two 16-bit floats exactly, and XLA keeps
            # `reduce_precision`. The quotient is float32's correctly rounded one, rounded once more,
            # as ml_dtypes does.
            info = jnp.finfo(x.dtype)
            rounded = functools.partial(jax.lax.reduce_precision, exponent_bits=info.nexp, mantissa_bits=info.nmant)
        # The largest magnitude is exact in any precision; NumPy adds the epsilon in the input's dtype.
        largest = jnp.max(jnp.abs(x), axis=axis, keepdims=True).astype(jnp.float32)
        epsilon = jnp.asarray(_EPSILON, x.dtype).astype(jnp.float32)
        scale = rounded(jnp.float32(high) / rounded(largest + epsilon))
        product = rounded(x.astype(jnp.float32) * scale)
        return jnp.clip(jnp.round(product), low, high).astype(jnp.int8), scale.astype(x.dtype)

    return quantize


_in_flight = threading.local()


def _one_in_flight(result):
    """Waits for the quantization dispatched before `result`'s: the next read overlaps one, and no more queue up."""
    import jax

    previous, _in_flight.result = getattr(_in_flight, "result", None), result
    if previous is not None:
        jax.block_until_ready(previous)


def _abs_max_quantize(value, axis, value_range=(-127, 127), dtype=None):
    """Keras' `abs_max_quantize(value.astype(dtype), axis, value_range, to_numpy=True)`: int8 values and scale.

    On JAX, for float32 and bfloat16, one jitted function (two fused passes,
    the largest magnitude then the scaled and rounded values, instead of
    NumPy's six) with NumPy's arithmetic bit for bit, `dtype` (the variable's,
    by default `value`'s) taken inside it. Its results are JAX arrays,
    computed while the next tensor is read (one at a time). Other dtypes and
    backends call Keras' function (NumPy results).
    """
    low, high = value_range
    dtype = value.dtype if dtype is None else np.dtype(dtype)
    floats = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
    if keras.backend.backend() != "jax" or value.dtype not in floats or dtype not in floats:
        value = value.astype(dtype, copy=False)
        values, scale = keras.quantizers.abs_max_quantize(value, axis, value_range, "int8", _EPSILON, to_numpy=True)
        return keras.ops.convert_to_numpy(values), keras.ops.convert_to_numpy(scale)
    axis = tuple(a % value.ndim for a in axis)
    result = _compiled()(value, dtype.name, axis, low, high)
    _one_in_flight(result)
    return result


def _grouped_quantize(value, block_size):
    """Keras' `abs_max_quantize_grouped_with_zero_point` (4 bits, groups of `block_size` rows) in NumPy."""
    outputs = keras.quantizers.abs_max_quantize_grouped_with_zero_point(
        value, block_size=block_size, value_range=(-8, 7), dtype="int8", epsilon=_EPSILON, to_numpy=True
    )
    return [keras.ops.convert_to_numpy(output) for output in outputs]


def _packed(values):
    """Two 4-bit values per byte along the last axis, as Keras' `pack_int4` stores them."""
    return keras.ops.convert_to_numpy(keras.quantizers.pack_int4(values, axis=-1)[0])


def _int4_block_size(layer):
    """The block size of `layer`'s int4 policy, `None` for one scale per channel."""
    block_size = getattr(_own_policy(layer), "block_size", None)
    return None if block_size in (None, -1) else block_size


def _quantized_kernel(layer, value, dtype):
    """What `quantize` gives a `Dense` or `EinsumDense` layer whose float kernel is `value` (in `dtype`)."""
    einsum = isinstance(layer, keras.layers.EinsumDense)
    reduced = tuple(layer._kernel_reduced_axes) if einsum else (0,)
    if layer.quantization_mode == "int8":
        values, scale = _abs_max_quantize(value, reduced, dtype=dtype)
        if einsum:
            scale = layer._adjust_scale_for_quant(scale, "kernel")
        else:
            scale = np.squeeze(scale, axis=0)
        return {"kernel": values, "kernel_scale": scale}
    # int4: the kernel as a matrix `[reduced axes, the rest]`, packed along its columns.
    rows = math.prod(value.shape[axis] for axis in reduced)
    flat = value.reshape(rows, -1)
    block_size = _int4_block_size(layer)
    if block_size is None:
        values, scale = _abs_max_quantize(flat, (0,), value_range=(-8, 7), dtype=dtype)
        return {"kernel": _packed(values), "kernel_scale": np.squeeze(scale, axis=0)}
    values, scale, zero = _grouped_quantize(flat.astype(dtype, copy=False), block_size)
    group = np.floor_divide(np.arange(rows, dtype="float32"), block_size)
    return {"kernel": _packed(values), "kernel_scale": scale, "kernel_zero": zero, "g_idx": group}


def _quantized_table(layer, value, dtype):
    """What `quantize` gives an `Embedding` whose `(input_dim, output_dim)` table is `value` (in `dtype`)."""
    if layer.quantization_mode == "int8":
        values, scale = _abs_max_quantize(value, (-1,), dtype=dtype)
        return {"embeddings": values, "embeddings_scale": np.squeeze(scale, axis=-1)}
    block_size = _int4_block_size(layer)
    if block_size is None:
        values, scale = _abs_max_quantize(value, (-1,), value_range=(-8, 7), dtype=dtype)
        return {"embeddings": _packed(values), "embeddings_scale": np.squeeze(scale, axis=-1)}
    # Groups run along each row (one scale each): Keras quantizes the transposed table.
    values, scale, zero = (array.T for array in _grouped_quantize(value.T.astype(dtype, copy=False), block_size))
    return {"embeddings": _packed(values), "embeddings_scale": scale, "embeddings_zero": zero}


def quantized_values(layer, variable_name, value):
    """The variables `layer.quantize(mode)` would hold if its float `variable_name` were `value`.

    `layer` is built quantized (see `layers_built_quantized`); `value` is
    the float weight in the variable's layout and dtype. The arithmetic is
    Keras' own quantizers' (`abs_max_quantize`, `pack_int4`, ...) with the
    axes each layer's `quantize` gives them, run on `value` alone: no float
    copy of the layer is built. Embedding tables above `_BLOCK_BYTES` are
    quantized in blocks of rows (each row has its own scales), so that at
    most one block's temporaries exist.

    Returns:
        `{name: array}` for the variables that quantization creates (the int8
        or packed int4 kernel or table, its scales, an int4 layer's zero
        points and groups), to assign to `layer`'s variables of the same names.
    """
    # Keras quantizes the float variable, in the layer's variable dtype (taken by the quantizers).
    value, dtype = np.asarray(value), numpy_dtype(_own_policy(layer).variable_dtype)
    if isinstance(layer, keras.layers.Embedding):
        if getattr(layer, "tie_weights", True) is False:
            raise NotImplementedError(
                f"`{layer.path}`: quantizing an untied `ReversibleEmbedding` while loading is not supported; "
                "load it in float and call `quantize`."
            )
        if variable_name != "embeddings":
            raise ValueError(f"`{layer.path}` is filled through its `embeddings`, not `{variable_name}`.")
    elif variable_name != "kernel":
        raise ValueError(f"`{layer.path}` is filled through its `kernel`, not `{variable_name}`.")
    if not isinstance(layer, keras.layers.Embedding):
        return _quantized_kernel(layer, value, dtype)
    row_bytes = value.shape[1] * dtype.itemsize
    if value.shape[0] * row_bytes <= _BLOCK_BYTES:
        return _quantized_table(layer, value, dtype)
    rows = max(1, _BLOCK_BYTES // row_bytes)
    values = {}
    for start in range(0, value.shape[0], rows):
        block = value[start : start + rows]
        for name, quantized in _quantized_table(layer, block, dtype).items():
            if name not in values:
                values[name] = _empty_like_rows(quantized, value.shape[0])
            values[name] = _placed(values[name], quantized, start)
    return values


def _empty_like_rows(part, rows):
    """An array for `rows` rows of `part`'s: NumPy, or JAX where `part` is a JAX array (the jitted quantizer's)."""
    if isinstance(part, np.ndarray):
        return np.empty((rows, *part.shape[1:]), part.dtype)
    import jax.numpy as jnp

    return jnp.empty((rows, *part.shape[1:]), part.dtype)


def _placed(whole, part, start):
    """`whole` with `part` written at row `start`: in place, and in JAX without waiting for `part`."""
    if isinstance(whole, np.ndarray):
        whole[start : start + part.shape[0]] = part
        return whole
    return _compiled_placement()(whole, part, start)


@functools.cache
def _compiled_placement():
    import jax

    # `whole` is donated: its buffer is written in place, not copied.
    return jax.jit(
        lambda whole, part, start: jax.lax.dynamic_update_slice_in_dim(whole, part, start, 0), donate_argnums=0
    )


def assign_by_name(layer, values):
    """Fills `layer`'s variables of the names in `{name: array}` (from `quantized_values`)."""
    by_name = {variable.name: variable for variable in layer.weights}
    for name in list(values):
        fill_from_values(by_name[name], values.pop(name))


def build_quantized(build, dtype, quantize=None):
    """`build(dtype)`, with the layers `quantize` converts built quantized when `quantize` is a mode."""
    if quantize is None:
        return build(dtype)
    with layers_built_quantized(quantize):
        return build(dtype)
