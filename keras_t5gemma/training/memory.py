"""Memory per device of a sharded T5Gemma 2, from its variables' shapes and the layout map.

`bytes_per_device` is exact for weights and optimizer slots: it is what each
device holds once the layout map has split the variables (checked against
the shards JAX places in `tests/test_multihost.py`). `abstract_backbone`
gives the variables of a released size without allocating them, so the
figures of `tools/memory_table.py` come from the real layer shapes.
"""

import math

import keras
import numpy as np

from keras_t5gemma.utils.keras_hub_compat import variables_without_values


def shard_shape(shape, axes, device_mesh):
    """The shape of one device's shard of an array of `shape` laid out as `axes` on `device_mesh`."""
    sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    return tuple(dim if axis is None else -(-dim // sizes[axis]) for dim, axis in zip(shape, axes))


def bytes_per_device(variables, layout_map, dtype=None):
    """Bytes of `variables` that each device holds under `layout_map`.

    Args:
        variables: Keras variables (anything with `path`, `shape`, `dtype`).
            A variable the map does not name is replicated.
        layout_map: `keras.distribution.LayoutMap`, e.g.
            `T5Gemma2Backbone.get_layout_map(mesh)`.
        dtype: str or None, the storage dtype to count in (default: each
            variable's own).

    Returns:
        int, the bytes on the device holding the most (every device holds
        the same with the T5Gemma 2 layout map).
    """
    total = 0
    for variable in variables:
        layout = layout_map[variable.path]
        shape = variable.shape if layout is None else shard_shape(variable.shape, layout.axes, layout_map.device_mesh)
        total += math.prod(shape) * np.dtype(dtype or keras.backend.standardize_dtype(variable.dtype)).itemsize
    return total


def abstract_backbone(config, text_only=False, lora_rank=None):
    """A `T5Gemma2Backbone` of a Hugging Face `config.json` dict whose weights are never allocated.

    Built in `variables_without_values`: its variables have paths, shapes and
    dtypes but no values, now or later (a plain `StatelessScope` would leave
    them for the next `predict` to allocate), so a 4b-4b costs no memory. Use
    it for counting only; `lora_rank` enables LoRA (frozen base weights,
    trainable adapters).
    """
    from keras_t5gemma.conversion.config import backbone_from_hf_config

    with variables_without_values():
        backbone = backbone_from_hf_config(config, text_only=text_only)
        if lora_rank:
            backbone.enable_lora(lora_rank)
    return backbone
