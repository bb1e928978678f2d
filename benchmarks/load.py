"""Loading the released shapes: seconds and peak memory against `transformers` and KerasHub (issue 39).

    python benchmarks/load.py                       # 270m and 1b, two rounds
    python benchmarks/load.py --sizes 1b --rounds 3 --cases transformers ours_hf ours_preset
    python benchmarks/load.py --sizes 270m --cases ours_sharded   # 4 processes, 4-way model parallel

For each size a random bfloat16 checkpoint is written with the keys, shapes
and `config.json` of `transformers` 5.23's `T5Gemma2ForConditionalGeneration`
(the 270m config with Gemma 3's 1B / 4B text sizes, as
`tests/test_released_sizes.py` builds them; the model is made on PyTorch's meta
device, the tensors drawn and written in shards of at most 2 GB by the
`safetensors` library, so that writing needs no copy of the model). Our
preset is saved once from it, and KerasHub reads a copy in the key layout its
0.32 converter knows. Every case then runs in a fresh process, the cases
interleaved round by round (A, B, C, A, B, C):

- `transformers`: `from_pretrained(dtype=bfloat16)`, then every weight summed once (touched);
- `ours_hf`: `T5Gemma2Backbone.from_preset(folder, dtype="bfloat16")`;
- `ours_preset`: the same from our preset (`save_to_preset`);
- `keras_hub`: KerasHub 0.32's `T5Gemma2Backbone.from_preset` of the same weights, bfloat16;
- `ours_int8`: `from_preset(folder, dtype="bfloat16", quantize="int8")`;
- `ours_sharded`: 4 processes of one CPU device each (`jax.distributed` on
  127.0.0.1), the layout map on a (1, 4) mesh: each process's peak.

Seconds are wall time of the load alone (imports done); peak RSS is VmHWM of
the whole process. Everything written goes under `--directory` (default a
temporary folder) and is deleted at the end. Free disk is checked first and
sizes that do not fit are skipped, as are sizes whose checkpoint exceeds
`--max-memory-fraction` of the available memory.
"""

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import ROOT  # noqa: E402
from _common import peak_rss  # noqa: E402
from _common import print_results  # noqa: E402

TEXT_SIZES = {
    "270m": None,
    "1b": dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1
    ),
    "4b": dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4
    ),
}
CASES = ("transformers", "ours_hf", "ours_preset", "keras_hub", "ours_int8", "ours_sharded")
SHARD_BYTES = 2 * 10**9
GIB = 2**30


def released_config(size):
    config = json.loads((ROOT / "tests/data/t5gemma-2-270m-270m.json").read_text())
    text = TEXT_SIZES[size]
    if text is not None:
        text = dict(text)
        text["layer_types"] = [
            "full_attention" if i % 6 == 5 else "sliding_attention" for i in range(text["num_hidden_layers"])
        ]
        for stack in (config["encoder"]["text_config"], config["decoder"]):
            stack.update(copy.deepcopy(text))
    return config


def _tied(key):
    return key.startswith("model.decoder.embed_tokens.") or key.startswith("lm_head.")


def write_checkpoint(size, folder):
    """A random bfloat16 checkpoint of `size` in `folder`; its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import T5Gemma2Config
    from transformers import T5Gemma2ForConditionalGeneration

    config = T5Gemma2Config(**{k: v for k, v in released_config(size).items() if k != "model_type"})
    config.dtype = "bfloat16"
    with torch.device("meta"):
        model = T5Gemma2ForConditionalGeneration(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items() if not _tied(key)}
    del model
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    shards, shard, shard_bytes = [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            shards.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for key, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        std = 0.3 if len(shape) == 1 else 0.02
        shard[key] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
        shard_bytes += nbytes
    flush()
    count = len(shards)
    weight_map, total = {}, 0
    for number, (name, keys) in enumerate(shards, 1):
        final = f"model-{number:05d}-of-{count:05d}.safetensors"
        (folder / name).rename(folder / final)
        total += (folder / final).stat().st_size
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def keras_hub_copy(source, folder):
    """The checkpoint as KerasHub 0.32 reads it: the released keys, `factor` given, no vision config."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)

    # The tensors are written under the module paths of `state_dict()` (`encoder.text_model.`); KerasHub looks
    # for the released files' keys (`encoder.embed_tokens.weight`: a suffix match).
    def rename(key):
        return key.replace("encoder.text_model.", "encoder.").replace("vision_tower.", "vision_tower.vision_model.")

    for path in sorted(source.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as file:
            save_file({rename(k): file.get_tensor(k) for k in file.keys()}, folder / path.name, {"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((source / "config.json").read_text())
    for text in (config["encoder"]["text_config"], config["decoder"]):
        text["rope_parameters"]["full_attention"].setdefault("factor", 1.0)
    config["encoder"].pop("vision_config", None)  # as benchmarks/_common.py: KerasHub reads the text model
    (folder / "config.json").write_text(json.dumps(config))


def save_our_preset(source, folder):
    from keras_t5gemma import T5Gemma2Backbone

    T5Gemma2Backbone.from_preset(str(source), dtype="bfloat16").save_to_preset(str(folder))


# The children: each measures one load in a fresh process.


def _load(case, folder):
    if case == "transformers":
        import torch
        from transformers import T5Gemma2ForConditionalGeneration

        model = T5Gemma2ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.sum()
        return sum(p.numel() * p.element_size() for p in model.parameters())
    if case == "keras_hub":
        from keras_hub.models import T5Gemma2Backbone

        return _bytes(T5Gemma2Backbone.from_preset(f"{folder}", dtype="bfloat16"))
    from keras_t5gemma import T5Gemma2Backbone

    quantize = "int8" if case == "ours_int8" else None
    return _bytes(T5Gemma2Backbone.from_preset(folder, dtype="bfloat16", quantize=quantize))


def _bytes(model):
    from keras_t5gemma.utils.loading import model_bytes

    return model_bytes(model)


def child(case, folder):
    import keras  # noqa: F401  (the backend starts before the clock)

    if case != "transformers":
        keras.ops.convert_to_numpy(keras.ops.zeros((1,)))
    started = time.perf_counter()
    weights = _load(case, folder)
    print_results({"seconds": time.perf_counter() - started, "peak": peak_rss(), "weights": weights})


def sharded_child(folder, process_id, processes, port):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    keras.distribution.initialize(f"127.0.0.1:{port}", processes, process_id)
    from keras_t5gemma import T5Gemma2Backbone
    from keras_t5gemma.models.layout import layout_map

    mesh = keras.distribution.DeviceMesh((1, processes), ("batch", "model"), keras.distribution.list_devices())
    distribution = keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")
    keras.ops.convert_to_numpy(keras.ops.zeros((1,)))
    started = time.perf_counter()
    with distribution.scope():
        backbone = T5Gemma2Backbone.from_preset(folder, dtype="bfloat16")
    seconds = time.perf_counter() - started
    held = sum(shard.data.nbytes for v in backbone.weights for shard in v.value.addressable_shards)
    print_results({"seconds": seconds, "peak": peak_rss(), "weights": held})


def _environment(extra=None):
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", **(extra or {})}
    environment.pop("XLA_FLAGS", None)
    return environment


def _results(output):
    for line in output.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS ") :])
    return None


def run_case(case, folder, timeout):
    if case == "ours_sharded":
        return run_sharded(folder, timeout)
    command = [sys.executable, __file__, "--child", case, str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {case}: timed out after {timeout}s", flush=True)
        return None
    results = _results(result.stdout)
    if results is None:
        print(f"  {case} failed:\n{result.stdout[-1500:]}\n{result.stderr[-2500:]}", flush=True)
    return results


def run_sharded(folder, timeout, processes=4):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--sharded-child", str(folder), str(i), str(processes), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}),
        )
        for i in range(processes)
    ]
    outputs = []
    for process in children:
        try:
            outputs.append(process.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in children:
                other.kill()
            print(f"  ours_sharded: timed out after {timeout}s", flush=True)
            return None
    results = [_results(out) for out, _ in outputs]
    if None in results:
        print(f"  ours_sharded failed:\n{outputs[0][0][-1500:]}\n{outputs[0][1][-2500:]}", flush=True)
        return None
    return {
        "seconds": max(r["seconds"] for r in results),
        "peak": max(r["peak"] for r in results),
        "weights": max(r["weights"] for r in results),
    }


def _available_memory():
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["270m", "1b"], choices=list(TEXT_SIZES))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--directory", help="where to write (default: a temporary folder); emptied at the end")
    parser.add_argument("--max-memory-fraction", type=float, default=0.6)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sharded-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.sharded_child:
        folder, process_id, processes, port = args.sharded_child
        return sharded_child(folder, int(process_id), int(processes), int(port))

    print(f"command: {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    base = Path(args.directory or tempfile.mkdtemp(prefix="load_benchmark_"))
    table = []
    try:
        for size in args.sizes:
            table.extend(measure(size, args, base / size))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("| size | case | seconds (median) | peak RSS GiB (median) | weights GiB | runs |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def memory_for(case, checkpoint_bytes, wait=120):
    """Whether the memory a case needs is available now (the machine is shared): waits up to `wait` s, else skips.

    A load peaks near the weights plus about 1 GiB (`keras_hub`: twice the
    weights); the sharded case runs 4 processes of about a quarter of them
    plus 1 GiB each.
    """
    need = {"keras_hub": 3 * checkpoint_bytes, "ours_sharded": checkpoint_bytes + 4 * GIB}.get(case, checkpoint_bytes)
    need += GIB
    deadline = time.monotonic() + wait
    while _available_memory() < need:
        if time.monotonic() > deadline:
            print(
                f"  {case}: skipped, it needs about {need / GIB:.1f} GiB and "
                f"{_available_memory() / GIB:.1f} GiB is available",
                flush=True,
            )
            return False
        time.sleep(5)
    return True


def measure(size, args, folder):
    from keras_t5gemma.models.t5gemma2.t5gemma2_presets import backbone_presets

    parameters = backbone_presets[f"t5gemma2_{size}_{size}"]["params"]
    needed = 2 * parameters * (2 + ("keras_hub" in args.cases) + ("ours_preset" in args.cases))
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else "/tmp").free
    if needed > free:
        print(f"{size}: skipped, it needs about {needed / GIB:.1f} GiB of disk and {free / GIB:.1f} GiB is free.")
        return []
    if 2 * parameters > args.max_memory_fraction * _available_memory():
        print(
            f"{size}: skipped, its {2 * parameters / GIB:.1f} GiB of weights exceed "
            f"{args.max_memory_fraction:.0%} of the {_available_memory() / GIB:.1f} GiB available."
        )
        return []
    started = time.perf_counter()
    checkpoint = folder / "hf"
    total = write_checkpoint(size, checkpoint)
    folders = {case: checkpoint for case in CASES}
    if "ours_preset" in args.cases:
        folders["ours_preset"] = folder / "preset"
        save_our_preset_in_child(checkpoint, folders["ours_preset"])
    if "keras_hub" in args.cases:
        folders["keras_hub"] = folder / "keras_hub"
        keras_hub_copy(checkpoint, folders["keras_hub"])
    print(f"{size}: {total / GIB:.2f} GiB checkpoint, prepared in {time.perf_counter() - started:.0f}s", flush=True)
    runs = {case: [] for case in args.cases}
    for round_number in range(args.rounds):
        for case in args.cases:
            if not memory_for(case, total):
                continue
            result = run_case(case, folders[case], args.timeout)
            if result is not None:
                runs[case].append(result)
                print(
                    f"  round {round_number + 1} {case}: {result['seconds']:.1f} s, peak "
                    f"{result['peak'] / GIB:.2f} GiB (load average {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    rows = []
    for case, results in runs.items():
        if results:
            rows.append(
                (
                    size,
                    case,
                    f"{statistics.median(r['seconds'] for r in results):.1f}",
                    f"{statistics.median(r['peak'] for r in results) / GIB:.2f}",
                    f"{results[0]['weights'] / GIB:.2f}",
                    len(results),
                )
            )
    if runs.get("ours_sharded") and runs.get("ours_hf"):
        sharded = statistics.median(r["peak"] for r in runs["ours_sharded"])
        whole = statistics.median(r["peak"] for r in runs["ours_hf"])
        print(f"{size}: a 4-way process peaks at {sharded / whole:.2%} of the unsharded load's peak", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def save_our_preset_in_child(checkpoint, preset):
    code = (
        "import sys; sys.path.insert(0, %r); from load import save_our_preset; from pathlib import Path; "
        "save_our_preset(Path(%r), Path(%r))" % (str(Path(__file__).parent), str(checkpoint), str(preset))
    )
    subprocess.run([sys.executable, "-c", code], env=_environment(), check=True, capture_output=True)


if __name__ == "__main__":
    main()
