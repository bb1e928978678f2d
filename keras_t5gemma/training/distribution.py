"""The distribution `fine-tune` trains under: a `BATCHxMODEL` mesh, or data parallel by default.

One command runs unchanged on every host of a pod: each process sees its own
devices, `keras.distribution.list_devices()` lists all of them, and the mesh
spans them all. Every host reads the same data file and feeds its own rows
of each global batch (`process_rows`); JAX assembles the global batch from
the processes' parts, split over the mesh's batch axis.
"""

import re

import keras

_MESH = re.compile(r"^(\d+)x(\d+)$")


def parse_mesh(text):
    """`(batch, model)` from `"BATCHxMODEL"`, e.g. `"2x4"`.

    Raises:
        ValueError: for anything else, naming the text.
    """
    match = _MESH.match(text.strip().lower())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"--mesh must be BATCHxMODEL with positive sizes, e.g. 2x4; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def make_distribution(mesh_shape=None, devices=None):
    """A Keras distribution over `devices` (default: every device of every process).

    Args:
        mesh_shape: `(batch, model)` or None. None: `DataParallel` over all
            devices when there are several, no distribution with one.
        devices: list of device names, as `keras.distribution.list_devices()`.

    Returns:
        `keras.distribution.ModelParallel` with the T5Gemma 2 layout map,
        `keras.distribution.DataParallel`, or None.
    """
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

    if keras.backend.backend() != "jax":
        if mesh_shape is not None:
            raise ValueError(f"--mesh needs the JAX backend; this is {keras.backend.backend()}")
        return None
    devices = devices or keras.distribution.list_devices()
    # Each process feeds its own rows (`process_rows`): Keras must not split them again.
    if mesh_shape is None:
        if len(devices) == 1:
            return None
        return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    batch, model = mesh_shape
    if batch * model != len(devices):
        raise ValueError(f"--mesh {batch}x{model} needs {batch * model} devices; there are {len(devices)}")
    mesh = keras.distribution.DeviceMesh((batch, model), ("batch", "model"), devices)
    return keras.distribution.ModelParallel(
        layout_map=T5Gemma2Backbone.get_layout_map(mesh), batch_dim_name="batch", auto_shard_dataset=False
    )


def batch_axis_size(distribution):
    """How many ways `distribution` splits a batch (1 without one)."""
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return dict(zip(mesh.axis_names, mesh.shape))[distribution.batch_dim_name]


def data_shards(distribution):
    """`(count, index)`: how many different parts of each global batch the processes feed, and this process' part.

    Processes split the batch as far as the batch axis goes; processes that
    hold the same rows (more processes than batch shards, e.g. a `1x16` mesh
    on 2 hosts) feed the same part.
    """
    if distribution is None or distribution.num_processes == 1:
        return 1, 0
    count = min(distribution.num_processes, batch_axis_size(distribution))
    return count, distribution.data_shard_id


def process_rows(num_examples, global_batch_size, distribution=None):
    """Indices of the examples this process feeds, in order: its part of each complete global batch.

    With `S` parts (`data_shards`), the process feeding part `s` feeds rows
    `[s * L, (s + 1) * L)` of every global batch (`L = global_batch_size / S`),
    the rows its devices hold on the batch axis. An incomplete last batch is
    left out.

    Raises:
        ValueError: if the parts cannot split the batch evenly.
    """
    count, index = data_shards(distribution)
    if global_batch_size % count:
        raise ValueError(f"the batch size {global_batch_size} must be a multiple of the {count} processes' parts")
    local = global_batch_size // count
    return [
        first + index * local + row
        for first in range(0, num_examples - global_batch_size + 1, global_batch_size)
        for row in range(local)
    ]
