"""Per-device training memory of the released T5Gemma 2 sizes on TPU slices (the README's table).

Weights, gradients and AdamW slots come from the real variables of each size
(built without allocating them, `keras_t5gemma.training.memory`) split by
`T5Gemma2Backbone.get_layout_map`: the same count `tests/test_multihost.py`
checks against the shards JAX places on 8 devices. Activations are an
estimate from the formula in `activation_bytes` (stated in the README).

    python tools/memory_table.py
"""

import copy
import json
import math
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone  # noqa: E402
from keras_t5gemma.training.memory import abstract_backbone  # noqa: E402
from keras_t5gemma.training.memory import bytes_per_device  # noqa: E402

ROOT = Path(__file__).parents[1]
GIB = 2**30
# Text stacks of the released sizes (Gemma 3 270m, 1b and 4b); all share the SigLIP tower of the 270m config.
SIZES = {
    "270m-270m": dict(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1
    ),
    "1b-1b": dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1
    ),
    "4b-4b": dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4
    ),
}
# (slice, chips = JAX devices, GiB per chip, mesh (batch, model)).
SLICES = [("v5e-8", 8, 16, (1, 8)), ("v5e-16", 16, 16, (2, 8)), ("v4-32", 16, 32, (2, 8)), ("v5e-32", 32, 16, (4, 8))]
BATCH, ENCODER_LENGTH, DECODER_LENGTH, LORA_RANK = 16, 512, 128, 8


def config(size):
    base = json.loads((ROOT / "tests/data/t5gemma-2-270m-270m.json").read_text())
    result = copy.deepcopy(base)
    for text in (result["encoder"]["text_config"], result["decoder"]):
        text.update(SIZES[size])
        text.pop("layer_types", None)  # rebuilt for the new depth: 5 sliding layers, then 1 full
    return result


def activation_bytes(backbone, batch, mesh, remat, bytes_per_value=2):
    """Estimated activations kept for the backward pass, per device.

    Per token and layer without rematerialisation: the residual stream and
    norms (4 D), queries, keys, values and attention output (2 N H + 2 K H),
    attention probabilities over the keys (N x keys: the encoder's length, or
    the decoder's plus the encoder's in the merged decoder attention), and the
    MLP's gate, up and product (3 I, split over the model axis). With
    per-layer rematerialisation only each layer's input (D) is kept, plus one
    layer's working set. Plus the `(B, T, V)` float32 logits and their
    gradient, split over the model axis. The batch is split over the batch axis.
    """
    data, model = mesh
    local = batch / data
    d = backbone.hidden_dim

    def layer(side, keys):
        # Each stack's own heads, head size and MLP width (KerasHub's `encoder_*`/`decoder_*`).
        n, k, h, i = (
            getattr(backbone, f"{side}_{name}")
            for name in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_dim")
        )
        return 4 * d + 2 * n * h + 2 * k * h + n * keys + 3 * i / model

    stacks = [
        ("encoder", backbone.encoder_num_layers, ENCODER_LENGTH, ENCODER_LENGTH),
        ("decoder", backbone.decoder_num_layers, DECODER_LENGTH, DECODER_LENGTH + ENCODER_LENGTH),
    ]
    if remat:
        kept = sum(layers * length * d for _, layers, length, _ in stacks)
        kept += max(length * layer(side, keys) for side, _, length, keys in stacks)
    else:
        kept = sum(layers * length * layer(side, keys) for side, layers, length, keys in stacks)
    logits = 2 * DECODER_LENGTH * backbone.vocabulary_size / model * 4
    return local * (kept * bytes_per_value + logits)


def main():
    keras.config.disable_interactive_logging()
    print(f"Global batch {BATCH}, {ENCODER_LENGTH} encoder and {DECODER_LENGTH} decoder tokens; GiB per device.\n")
    print("| size | parameters | training | slice (mesh) | weights | grads + AdamW | activations | + remat | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        full = abstract_backbone(config(size))
        parameters = sum(math.prod(w.shape) for w in full.weights)
        lora = abstract_backbone(config(size), lora_rank=LORA_RANK)
        for name, backbone, weight_dtype in (
            ("full, float32", full, "float32"),
            (f"LoRA {LORA_RANK}, bfloat16", lora, "bfloat16"),
        ):
            for slice_name, chips, memory, mesh in SLICES:
                devices = [f"cpu:{index}" for index in range(chips)]
                layouts = T5Gemma2Backbone.get_layout_map(
                    keras.distribution.DeviceMesh(mesh, ("batch", "model"), devices)
                )
                frozen = [w for w in backbone.weights if not w.trainable]
                trainable = [w for w in backbone.weights if w.trainable]
                weights = bytes_per_device(frozen, layouts, weight_dtype) + bytes_per_device(
                    trainable, layouts, "float32"
                )
                # A gradient and two AdamW slots per trainable weight, laid out like it.
                optimizer = 3 * bytes_per_device(trainable, layouts, "float32")
                value_bytes = 4 if weight_dtype == "float32" else 2
                activations = activation_bytes(backbone, BATCH, mesh, remat=False, bytes_per_value=value_bytes)
                remat = activation_bytes(backbone, BATCH, mesh, remat=True, bytes_per_value=value_bytes)
                fits = (
                    "yes"
                    if weights + optimizer + activations < 0.9 * memory * GIB
                    else ("with remat" if weights + optimizer + remat < 0.9 * memory * GIB else "no")
                )
                print(
                    f"| {size} | {parameters / 1e9:.2f}B | {name} | {slice_name} {mesh[0]}x{mesh[1]} | "
                    f"{weights / GIB:.2f} | {optimizer / GIB:.2f} | {activations / GIB:.2f} | {remat / GIB:.2f} | "
                    f"{fits} |"
                )


if __name__ == "__main__":
    main()
