"""Loading a checkpoint straight into int8 or int4: no float copy of the model is ever held.

`quantized_dtype_policy` gives the layers that `quantize` converts (the
projections and the embedding table, `models.quantization.quantizable`) a
quantized dtype policy before they are built, as Keras builds a reloaded
quantized model: they get their int8 (or packed int4) variables and scales
and never a float kernel. `quantized_values` then fills them from each float checkpoint tensor
as it is read, with the arithmetic of Keras' own `layer.quantize` (it runs on
a throw-away float copy of the layer), so that the model equals one loaded in
float and quantized afterwards, bit for bit.
"""

import gc
import weakref

import keras
import numpy as np

from keras_t5gemma.models.quantization import collections_of_new_objects_only
from keras_t5gemma.models.quantization import quantizable
from keras_t5gemma.utils.keras_hub_compat import variables_without_values
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


def quantized_dtype_policy(build, dtype, mode):
    """The dtype policy that builds `build`'s model with its quantizable layers already quantized.

    Args:
        build: callable `dtype -> model`, the model to load (a backbone).
        dtype: the float dtype policy (`None`, `"float32"`, `"bfloat16"`, ...)
            of the other layers, and the source of the quantized ones.
        mode: the quantization mode, `"int8"` or `"int4"` (Keras' default
            config for it).

    Returns:
        A `keras.dtype_policies.DTypePolicyMap`: `mode` from `dtype` for each
        layer `model.quantize(mode)` would convert, `dtype` for the rest.
        Finding those layers builds the model once without allocating its
        variables.
    """
    check_quantize_mode(mode)
    policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
    with variables_without_values():
        outline = build(policy)
        paths = [layer.path for layer in outline._flatten_layers() if _converted_by_quantize(layer)]
    del outline
    quantized = keras.dtype_policies.get(f"{_policy_mode(mode)}_from_{policy.name}")
    return keras.dtype_policies.DTypePolicyMap(default_policy=policy, policy_map=dict.fromkeys(paths, quantized))


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


def _float_copy(layer, **overrides):
    """A built float layer with `layer`'s config (`overrides` applied) and its source float policy."""
    policy = _own_policy(layer)
    config = {**layer.get_config(), **overrides, "dtype": policy.get_config()["source_name"]}
    copy = type(layer).from_config(config)
    build_config = layer.get_build_config()
    if build_config:
        copy.build_from_config(build_config)
    else:
        copy.build()
    return copy


def _quantize_copy(layer, variable_name, value, **overrides):
    """Keras' `quantize` on a float copy of `layer` holding `value`; its new variables' values by name."""
    with collections_of_new_objects_only():
        copy = _float_copy(layer, **overrides)
        [target] = [variable for variable in copy.weights if variable.name == variable_name]
        target.assign(value)
        before = {id(variable) for variable in copy.weights}
        copy.quantize(_own_policy(layer).quantization_mode)
        values = {v.name: keras.ops.convert_to_numpy(v) for v in copy.weights if id(v) not in before}
        del copy, target
        gc.collect()  # the copy (layers hold reference cycles) before it is frozen with the next one
    return values


def quantized_values(layer, variable_name, value):
    """The variables `layer.quantize(mode)` would hold if its float `variable_name` were `value`.

    `layer` is built quantized (see `quantized_dtype_policy`); `value` is
    the float weight in the variable's layout. Embedding tables above
    `_BLOCK_BYTES` are quantized in blocks of rows, each with the same
    per-row arithmetic, so that at most one block's temporaries exist.

    Returns:
        `{name: array}` for the variables that quantization creates (the int8
        or packed int4 kernel or table and its scale), to assign to `layer`'s variables of
        the same names.
    """
    value = np.asarray(value)
    if not isinstance(layer, keras.layers.Embedding) or value.nbytes <= _BLOCK_BYTES:
        return _quantize_copy(layer, variable_name, value)
    rows = max(1, _BLOCK_BYTES // (value.nbytes // value.shape[0]))
    values = {}
    for start in range(0, value.shape[0], rows):
        block = value[start : start + rows]
        for name, quantized in _quantize_copy(layer, variable_name, block, input_dim=block.shape[0]).items():
            if name == "g_idx":  # int4 blocks' group of each column: the same for every row
                values[name] = quantized
                continue
            if name not in values:
                values[name] = np.empty((value.shape[0], *quantized.shape[1:]), quantized.dtype)
            values[name][start : start + block.shape[0]] = quantized
    return values


def assign_by_name(layer, values):
    """Assigns `{name: array}` (from `quantized_values`) to `layer`'s variables of those names."""
    by_name = {variable.name: variable for variable in layer.weights}
    for name in list(values):
        by_name[name].assign(values.pop(name))


def build_quantized(build, dtype, quantize=None):
    """`build(dtype)`, with the layers `quantize` converts built quantized when `quantize` is a mode."""
    if quantize is not None:
        dtype = quantized_dtype_policy(build, dtype, quantize)
    return build(dtype)
