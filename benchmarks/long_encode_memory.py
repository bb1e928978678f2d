"""Memory of a 32K-token encode on the blockwise path, both families, without weights or a run.

    python benchmarks/long_encode_memory.py                   # 32K: T5Gemma 2B-2B (bf16), T5Gemma 2 270m (f32)
    python benchmarks/long_encode_memory.py --lengths 8192,32768 --cells t5gemma_2b_2b

Each cell builds one encoder (`encoder_only=True`, built without values: no
weights in memory) in its own process and compiles its encode ahead of time
with JAX for one text of the given length (`jax.jit(...).lower(...)` on
abstract weights, as `benchmarks/long_context.py` compiles it, then
`.compile()`), and reads XLA's buffer assignment (`memory_analysis()`): the
temporary buffers of the whole encode at their peak (XLA's CPU runtime
allocates them as one block per run) and the output. Their sum is the memory
an encode needs above the model and its inputs, what `long_context.py`
measures as resident memory above the built model (there: 2.63 GiB for
T5Gemma 2 270m at 32K in float32, which this method gives as the
`t5gemma2_270m` cell, for comparison).

No encode runs: the 2B-2B encoder's 32K encode is about 250 TFLOP, hours on
this machine's two shared cores. The blockwise path holds one layer's
attention and MLP activations at a time, so the peak does not grow with
depth; it is given per token and per hidden unit too.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
CELLS = {
    # name: (family, config file, dtype)
    "t5gemma_2b_2b": ("t5gemma", ROOT / "tests" / "data" / "t5gemma-2b-2b.json", "bfloat16"),
    "t5gemma2_270m": ("t5gemma2", None, "float32"),
}
GIB = 2**30


def _encoder(family, config_path, dtype, layer_type=None):
    """The cell's encoder, all its layers, or one layer of `layer_type`."""
    from keras_t5gemma.utils.loading import built_without_values

    one_layer = {} if layer_type is None else {"encoder_num_layers": 1, "encoder_layer_types": [layer_type]}
    if family == "t5gemma":
        from keras_t5gemma.conversion.t5gemma_config import backbone_kwargs_from_t5gemma_config
        from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone

        kwargs = backbone_kwargs_from_t5gemma_config(json.loads(Path(config_path).read_text())) | one_layer
        return built_without_values(lambda: T5GemmaBackbone(**kwargs, encoder_only=True, dtype=dtype))
    # The released 270m-270m text config, as `long_context.py` builds it.
    sys.path.insert(0, str(Path(__file__).parent))
    import _common

    from keras_t5gemma.conversion.config import backbone_kwargs_from_hf_config
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone

    config = _common.float32_config(_common.released_config("270m-270m"))
    config["encoder"].pop("vision_config", None)
    kwargs = backbone_kwargs_from_hf_config(config)
    kwargs.pop("vision_config", None)
    kwargs.pop("mm_tokens_per_image", None)
    kwargs |= one_layer
    return built_without_values(lambda: T5Gemma2Backbone(**kwargs, encoder_only=True, dtype=dtype))


def measure(cell, length, layer_type=None):
    """Child: compile one encoder's encode of `length` tokens; its buffer sizes."""
    import jax
    import keras
    import numpy as np

    family, config_path, dtype = CELLS[cell]
    backbone = _encoder(family, config_path, dtype, layer_type)
    variables = backbone.trainable_variables + backbone.non_trainable_variables
    state = [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in variables]
    ids = jax.ShapeDtypeStruct((1, length), np.int32)

    def stateless(state, ids, mask):
        with keras.StatelessScope(state_mapping=list(zip(variables, state))):
            return backbone.encode(ids, mask)

    started = time.perf_counter()
    compiled = jax.jit(stateless).lower(state, ids, ids).compile()
    analysis = compiled.memory_analysis()
    return {
        "compile_s": time.perf_counter() - started,
        "layers": len(backbone.encoder.transformer_layers),
        "hidden_dim": backbone.encoder_hidden_dim,
        "weight_bytes": sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables),
        "temp_bytes": analysis.temp_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768", help="comma-separated token counts")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {', '.join(CELLS)}")
    layers = "also one-layer encoders of each layer type: the peak of one sliding and one full layer"
    parser.add_argument("--per-layer", action="store_true", help=layers)
    parser.add_argument("--layer-type", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = [int(length) for length in args.lengths.split(",")]
    if args.child:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        print(json.dumps(measure(args.child, lengths[0], args.layer_type)))
        return
    print(f"one text, batch 1, JAX on CPU, compiled ahead of time; load average {os.getloadavg()}")
    columns = ("tokens", "layers", "weights GiB", "peak GiB", "KiB/token", "B/token/unit", "compile s")
    print(f"{'cell':<30}" + "".join(f"{name:>14}" for name in columns))
    layer_types = [None] + (["sliding_attention", "full_attention"] if args.per_layer else [])
    for cell, length, layer_type in itertools.product(args.cells.split(","), lengths, layer_types):
        command = [sys.executable, __file__, "--child", cell, "--lengths", str(length)]
        command += [] if layer_type is None else ["--layer-type", layer_type]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        peak = row["temp_bytes"] + row["output_bytes"]
        cells = [
            f"{length:,}",
            str(row["layers"]),
            f"{row['weight_bytes'] / GIB:.2f}",
            f"{peak / GIB:.2f}",
            f"{peak / length / 1024:.1f}",
            f"{peak / length / row['hidden_dim']:.1f}",
            f"{row['compile_s']:.0f}",
        ]
        name = cell if layer_type is None else f"{cell} {layer_type.split('_')[0]} layer"
        print(f"{name:<30}" + "".join(f"{value:>14}" for value in cells), flush=True)


if __name__ == "__main__":
    main()
