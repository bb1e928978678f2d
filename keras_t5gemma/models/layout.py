"""How T5Gemma 2 weights are sharded over a `(batch, model)` device mesh.

Every weight of the backbone maps to exactly one entry. The MLP kernels, the
token table and the vision projector are split two ways: over the model
axis along a dimension that divides for every released size, and over the
data axis along the other, so that each is held once across the mesh
(fully sharded data parallelism; XLA gathers a weight over the data axis
when its layer runs). Attention projections are split over the model axis
only (see below). Norm scales, biases and vectors are small and replicated.

Released sizes the splits must divide:
| | width D | heads N / kv K | head H | MLP I | vocab V |
|---|---|---|---|---|---|
| 270m | 640 | 4 / 1 | 256 | 2048 | 262144 |
| 1b | 1152 | 4 / 1 | 256 | 6912 | 262144 |
| 4b | 2560 | 8 / 4 | 256 | 10240 | 262144 |
| SigLIP | 1152 | 16 / 16 | 72 | 4304 | |
All split dimensions divide a model axis of up to 16 (SigLIP's MLP width,
16 x 269, is the limit) and a data axis of up to 32.
"""

import keras


def layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
    """A `keras.distribution.LayoutMap` for a `T5Gemma2Backbone`.

    Args:
        device_mesh: `keras.distribution.DeviceMesh` with both axes below.
        model_parallel_dim_name: str, the mesh axis weights are split over.
        data_parallel_dim_name: str, the mesh axis batches are split over;
            large weights are split over it too.

    Returns:
        `keras.distribution.LayoutMap` whose keys match every weight path of
        the backbone (text stacks, vision tower, projector) and the LoRA
        kernels `enable_lora` adds to any projection.

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), keras.distribution.list_devices())
    distribution = keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(f"`device_mesh` must be a `keras.distribution.DeviceMesh`; got {type(device_mesh)}.")
    for name in (model_parallel_dim_name, data_parallel_dim_name):
        if name not in device_mesh.axis_names:
            raise ValueError(f"`{name}` is not an axis of the device mesh {device_mesh.axis_names}.")
    model, data = model_parallel_dim_name, data_parallel_dim_name
    layouts = keras.distribution.LayoutMap(device_mesh)

    def kernel(pattern, axes):
        # A LoRA update `lora_kernel_a @ lora_kernel_b` has the kernel's shape:
        # `a` keeps the kernel's input axes (rank last), `b` its output axis,
        # so the update lands already sharded like the kernel it is added to.
        layouts[f"{pattern}/kernel"] = axes
        layouts[f"{pattern}/lora_kernel_a"] = (*axes[:-1], None)
        layouts[f"{pattern}/lora_kernel_b"] = (None, axes[-1])

    # Tied table `(V, D)`: vocabulary over the model axis, which also splits
    # the `(B, T, V)` logits of the output projection, the largest activation.
    layouts[".*token_embedding/table/embeddings"] = (model, data)
    layouts[".*token_embedding/eoi_embedding"] = (None,)

    # Attention `query_key_value` `(D, N + 2K, H)` (the cross-attention blocks' `query` `(D, N, H)`,
    # `key`/`value` `(D, K, H)`), output
    # `(N, H, D)`: split over the width D, not over heads. The releases have
    # 4 query heads (4 / 1 with one key/value head at 270m and 1b, 8 / 4 at
    # 4b), which a model axis of 8 cannot divide, and the head size carries
    # RoPE's rotated halves and the q/k norms, which a split would have to
    # gather. Every release's D divides any model axis up to 16 (SigLIP's as
    # well), so one rule serves text and vision. The price is that the
    # attention scores are computed on every model shard. The projections
    # stay whole over the data axis: SigLIP's head size (72) divides no data
    # axis above 8, and they are under a fifth of a 4b layer's weights.
    kernel(".*attention/(query_key_value|query|key|value)", (model, None, None))
    kernel(".*attention/attention_output", (None, None, model))
    layouts[".*attention/(query_key_value|query|key|value)/bias"] = (None, None)
    layouts[".*attention/attention_output/bias"] = (None,)

    # MLP `gate_up` `(D, 2, I)` (the two products fused), SigLIP's `up`
    # `(D, I)` and `down` `(I, D)`: the intermediate width over the model
    # axis (Megatron-style: each device holds the gate and up columns of the
    # same units, one all-reduce after `down`).
    kernel(".*feedforward/gate_up", (data, None, model))
    kernel(".*feedforward/up", (data, model))
    kernel(".*feedforward/down", (model, data))
    layouts[".*feedforward/(up|down)/bias"] = (None,)

    # RMSNorm scales (layer, q/k, final, projector) and SigLIP LayerNorms.
    layouts[".*_norm/scale"] = (None,)
    layouts[".*_norm/(gamma|beta)"] = (None,)

    # Vision tower: patch convolution `(P, P, 3, Dv)` and position table
    # `(patches, Dv)` over the vision width; the projector `(Dv, D)` over the
    # text width it writes into the encoder's embeddings.
    kernel(".*patch_embedding", (None, None, None, model))
    layouts[".*patch_embedding/bias"] = (None,)
    layouts[".*position_embedding"] = (None, model)
    kernel(".*projection", (data, model))
    return layouts
