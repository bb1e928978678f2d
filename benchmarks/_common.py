"""Plumbing shared by the benchmark scripts: configs, random checkpoints, children, memory, bandwidth.

Each measured implementation runs in a child process of its own (so that its
peak memory is its own); the child prints one `RESULTS {json}` line, which
`run_child` reads back.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def released_config(name="270m-270m"):
    """The released `config.json` of `google/t5gemma-2-NAME` (bundled under `tests/data`)."""
    return json.loads((ROOT / "tests" / "data" / f"t5gemma-2-{name}.json").read_text())


def tiny_config():
    """A tiny T5Gemma 2 config with a vision tower (28x28 images, 4 soft tokens), for quick runs."""
    text = {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "sliding_window": 32,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 7,
        "vision_use_head": False,
    }
    return {
        "model_type": "t5gemma2",
        "encoder": {
            "text_config": text,
            "vision_config": vision,
            "mm_tokens_per_image": 4,
            "boi_token_index": 1021,
            "eoi_token_index": 1022,
        },
        "decoder": dict(text),
        "image_token_index": 1023,
    }


def float32_config(config):
    """The config without `dtype` entries, so that `transformers` builds float32 modules."""
    if isinstance(config, dict):
        return {k: float32_config(v) for k, v in config.items() if k != "dtype"}
    return config


def write_random_checkpoint(config, directory, earlier_layout_copy=True):
    """A random float32 `transformers` checkpoint of `config`, and a copy KerasHub 0.32 reads.

    `config` is a T5Gemma 2 or (`model_type` "t5gemma") a T5Gemma config. The
    copy (T5Gemma 2 only, unless `earlier_layout_copy=False`) is in the
    earlier layout that KerasHub 0.32 reads: vision tower under
    `vision_model.`, `factor` in the full-attention RoPE parameters, no
    vision config (KerasHub's vision model cannot train without images).
    Returns the two folders (the second `None` without a copy).
    """
    import torch
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file
    from transformers import T5Gemma2Config
    from transformers import T5Gemma2ForConditionalGeneration

    current, earlier = Path(directory) / "current", Path(directory) / "earlier"
    torch.manual_seed(0)
    config_class, model_class = T5Gemma2Config, T5Gemma2ForConditionalGeneration
    if config.get("model_type") == "t5gemma":
        # KerasHub reads the first generation's current layout: no earlier copy.
        from transformers import T5GemmaConfig
        from transformers import T5GemmaForConditionalGeneration

        config_class, model_class, earlier_layout_copy = T5GemmaConfig, T5GemmaForConditionalGeneration, False
    model = model_class(config_class(**{k: v for k, v in float32_config(config).items() if k != "model_type"}))
    with torch.no_grad():
        for parameter in model.parameters():  # non-zero norms and end-of-image vector
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(current)
    del model
    if not earlier_layout_copy:
        return current, None
    earlier.mkdir(parents=True, exist_ok=True)
    rename = lambda key: key.replace("vision_tower.", "vision_tower.vision_model.")  # noqa: E731
    for path in current.glob("*.safetensors"):
        save_file({rename(k): v for k, v in load_file(path).items()}, earlier / path.name, metadata={"format": "pt"})
    for path in current.glob("*.json"):
        data = json.loads(path.read_text())
        if path.name == "config.json":
            for text in (data["encoder"]["text_config"], data["decoder"]):
                text["rope_parameters"]["full_attention"].setdefault("factor", 1.0)
            data["encoder"].pop("vision_config", None)
        if path.name.endswith("index.json"):
            data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        (earlier / path.name).write_text(json.dumps(data))
    return current, earlier


def memory_bandwidth():
    """Read bandwidth in bytes/s: the best of NumPy and XLA reductions over 1 GiB."""
    import jax
    import numpy as np

    data = np.ones(256 * 1024 * 1024, np.float32)
    best = 0.0
    on_device = jax.numpy.asarray(data)
    reduce = jax.jit(lambda x: x.sum())
    for function in (data.sum, lambda: reduce(on_device).block_until_ready()):
        function()
        started = time.perf_counter()
        for _ in range(5):
            function()
        best = max(best, 5 * data.nbytes / (time.perf_counter() - started))
    return best


def peak_rss():
    """The process's peak resident memory in bytes (VmHWM; getrusage carries the parent's over exec)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss():
    """Starts VmHWM again from the current resident size (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def current_rss():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def print_results(results):
    """What a child prints for `run_child`."""
    print("RESULTS " + json.dumps(results), flush=True)


def run_child(script, arguments, label, timeout=None, environment=None):
    """Runs `script` in a fresh process (`environment` added to ours); its `RESULTS` dict, or `None` on failure."""
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", **(environment or {})}
    command = [sys.executable, str(script), *map(str, arguments)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{label}: timed out after {timeout}s", file=sys.stderr)
        return None
    for line in result.stdout.splitlines():
        if line.startswith("RESULTS "):
            results = json.loads(line[len("RESULTS ") :])
            print(f"{label}: {results}", file=sys.stderr, flush=True)
            return results
    print(f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}", file=sys.stderr, flush=True)
    return None


def prompts(batch, length, vocabulary, seed=None):
    """Random token ids `(batch, length)` starting with `<bos>` (2)."""
    import numpy as np

    ids = np.random.default_rng(batch if seed is None else seed).integers(3, min(vocabulary, 255_000), (batch, length))
    ids = ids.astype("int32")
    ids[:, 0] = 2
    return ids


def training_inputs(encoder_ids, decoder_ids):
    """A seq2seq task's inputs for one training batch of token ids, with all-ones padding masks."""
    import numpy as np

    return {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": np.ones_like(encoder_ids),
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": np.ones_like(decoder_ids),
    }


def compile_for_training(seq_2_seq_lm):
    """The benchmarks' training step: AdamW(1e-5), cross-entropy over the vocabulary from logits."""
    import keras

    seq_2_seq_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
