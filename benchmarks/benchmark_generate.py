"""keras_t5gemma against KerasHub 0.32 and transformers, on the same random weights.

    python benchmarks/benchmark_generate.py                 # tiny and 270m-270m configs
    python benchmarks/benchmark_generate.py --configs tiny  # quick
    python benchmarks/benchmark_generate.py --configs t5gemma-tiny t5gemma-s-s  # the first T5Gemma family

For each config the script writes one random checkpoint with `transformers`
(float32), a copy in the earlier layout that KerasHub 0.32 reads (vision tower
under `vision_model.`, `factor` in the full-attention RoPE parameters; and no
vision config, since KerasHub's vision model cannot train without images), then
measures each implementation in its own process (so peak memory is its own).
The `t5gemma-*` configs are the first generation (Gemma 2 layers, text only):
`T5GemmaSeq2SeqLM` here, KerasHub's `T5GemmaSeq2SeqLM` and transformers'
`T5GemmaForConditionalGeneration`, all reading the one checkpoint. Measured:

- encoder time for a 512-token input (batch 1);
- greedy decode tokens/s for 64 new tokens at batch 1 and 8 (64-token
  prompts), timed on the second call;
- first-call time (compilation for the Keras ports);
- one training step, batch 4, 256 encoder / 64 decoder tokens;
- peak memory above the process's post-import baseline while loading, and
  while generating (the peak is reset after loading), next to the size of
  the weights.

It prints a table with the ratio of keras_t5gemma to each peer, and the decode
roofline: weight bytes read per batch-1 step divided by the measured memory
bandwidth. Timings are only comparable within one run on one machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

ROOT = Path(__file__).parents[1]
IMPLEMENTATIONS = ("keras_t5gemma", "keras_hub", "transformers")
NEW_TOKENS = 64
PROMPT_TOKENS = 64
ENCODER_TOKENS = 512
TRAIN_SHAPE = (4, 256, 64)


def t5gemma_tiny_config():
    """A tiny first-generation config: Gemma 2 layers alternating sliding/full, soft-capped logits."""
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
        "rope_theta": 10_000.0,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    }
    return {"model_type": "t5gemma", "encoder": dict(text), "decoder": dict(text)}


def t5gemma_released_config(name):
    return json.loads((ROOT / "tests" / "data" / f"t5gemma-{name}.json").read_text())


CONFIGS = {
    "tiny": _common.tiny_config,
    "270m": lambda: _common.released_config("270m-270m"),
    "t5gemma-tiny": t5gemma_tiny_config,
    "t5gemma-s-s": lambda: t5gemma_released_config("s-s"),
    "t5gemma-b-b": lambda: t5gemma_released_config("b-b"),
    "t5gemma-2b-2b": lambda: t5gemma_released_config("2b-2b"),
}
DEFAULT_CONFIGS = ("tiny", "270m")


def _is_first_generation(config):
    return config.get("model_type") == "t5gemma"


def _timed(function, repeats=1):
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return (time.perf_counter() - started) / repeats, result


def _prompts(batch, length, vocabulary):
    import numpy as np

    ids = np.random.default_rng(batch).integers(3, min(vocabulary, 255_000), (batch, length)).astype("int32")
    ids[:, 0] = 2
    return ids


def _keras_run(seq_2_seq_lm, backbone, vocabulary, implementation):
    """Measurements shared by the two Keras ports."""
    import jax
    import keras
    import numpy as np

    def generate_inputs(batch):
        encoder = _prompts(batch, PROMPT_TOKENS, vocabulary)
        decoder = np.zeros((batch, NEW_TOKENS + 1), "int32")
        decoder[:, 0] = 2
        return {
            "encoder_token_ids": encoder,
            "encoder_padding_mask": np.ones_like(encoder),
            "decoder_token_ids": decoder,
            "decoder_padding_mask": (decoder > 0).astype("int32"),
        }

    results = {"peak_load_bytes": _common.peak_rss()}
    _common.reset_peak_rss()
    seq_2_seq_lm.compile(sampler="greedy")
    first, _ = _timed(lambda: seq_2_seq_lm.generate(generate_inputs(1), stop_token_ids=None))
    results["first_call_s"] = first
    for batch in (1, 8):
        inputs = generate_inputs(batch)
        if batch == 8:
            seq_2_seq_lm.generate(inputs, stop_token_ids=None)
        seconds, _ = _timed(lambda: seq_2_seq_lm.generate(inputs, stop_token_ids=None))
        results[f"decode_tokens_per_s_b{batch}"] = batch * NEW_TOKENS / seconds
    results["peak_generate_bytes"] = _common.peak_rss()

    ids = _prompts(1, ENCODER_TOKENS, vocabulary)
    mask = np.ones_like(ids)
    state = [v.value for v in backbone.trainable_variables]

    if implementation == "keras_t5gemma":

        def encode(ids, mask):
            return backbone.encode(ids, mask)
    else:

        def encode(ids, mask):
            inputs = {
                "encoder_token_ids": ids,
                "encoder_padding_mask": mask,
                "decoder_token_ids": ids[:, :1],
                "decoder_padding_mask": mask[:, :1],
            }
            return backbone(inputs)["encoder_sequence_output"]

    @jax.jit
    def encoder(state, ids, mask):
        with keras.StatelessScope(state_mapping=list(zip(backbone.trainable_variables, state))):
            return encode(ids, mask)

    encoder(state, ids, mask).block_until_ready()
    results["encoder_512_s"], _ = _timed(lambda: encoder(state, ids, mask).block_until_ready(), repeats=3)

    batch, encoder_length, decoder_length = TRAIN_SHAPE
    encoder_ids = _prompts(batch, encoder_length, vocabulary)
    decoder_ids = _prompts(batch, decoder_length, vocabulary)
    x = _common.training_inputs(encoder_ids, decoder_ids)
    _common.compile_for_training(seq_2_seq_lm)
    seq_2_seq_lm.train_on_batch(x, decoder_ids)
    results["train_step_s"], _ = _timed(lambda: seq_2_seq_lm.train_on_batch(x, decoder_ids), repeats=2)
    return results


def _checkpoint_is_first_generation(checkpoint):
    return _is_first_generation(json.loads((Path(checkpoint) / "config.json").read_text()))


def run_keras_t5gemma(checkpoint):
    from keras_t5gemma import T5Gemma2Backbone
    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma import T5GemmaBackbone
    from keras_t5gemma import T5GemmaSeq2SeqLM
    from keras_t5gemma.utils.preset_utils import get_preset_loader

    backbone_class, task_class = T5Gemma2Backbone, T5Gemma2Seq2SeqLM
    if _checkpoint_is_first_generation(checkpoint):
        backbone_class, task_class = T5GemmaBackbone, T5GemmaSeq2SeqLM
    backbone = get_preset_loader(str(checkpoint)).load_backbone(backbone_class, True)
    seq_2_seq_lm = task_class(backbone)
    results = {"parameters": backbone.count_params(), "weight_bytes": 4 * backbone.count_params()}
    results.update(_keras_run(seq_2_seq_lm, backbone, backbone.vocabulary_size, "keras_t5gemma"))
    return results


def run_keras_hub(checkpoint):
    from keras_hub.models import T5Gemma2Backbone
    from keras_hub.models import T5Gemma2Seq2SeqLM
    from keras_hub.models import T5GemmaBackbone
    from keras_hub.models import T5GemmaSeq2SeqLM

    backbone_class, task_class = T5Gemma2Backbone, T5Gemma2Seq2SeqLM
    if _checkpoint_is_first_generation(checkpoint):
        backbone_class, task_class = T5GemmaBackbone, T5GemmaSeq2SeqLM
    backbone = backbone_class.from_preset(str(checkpoint))
    seq_2_seq_lm = task_class(backbone=backbone, preprocessor=None)
    results = {"parameters": backbone.count_params(), "weight_bytes": 4 * backbone.count_params()}
    results.update(_keras_run(seq_2_seq_lm, backbone, backbone.vocabulary_size, "keras_hub"))
    return results


def run_transformers(checkpoint):
    import torch
    from transformers import T5Gemma2ForConditionalGeneration
    from transformers import T5GemmaForConditionalGeneration

    model_class = T5Gemma2ForConditionalGeneration
    if _checkpoint_is_first_generation(checkpoint):
        model_class = T5GemmaForConditionalGeneration
    model = model_class.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    vocabulary = model.config.decoder.vocab_size
    parameters = model.num_parameters()
    results = {"parameters": parameters, "weight_bytes": 4 * parameters, "peak_load_bytes": _common.peak_rss()}
    _common.reset_peak_rss()

    def generate(batch):
        ids = torch.tensor(_prompts(batch, PROMPT_TOKENS, vocabulary)).long()
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )

    results["first_call_s"], _ = _timed(lambda: generate(1))
    for batch in (1, 8):
        if batch == 8:
            generate(8)
        seconds, _ = _timed(lambda: generate(batch))
        results[f"decode_tokens_per_s_b{batch}"] = batch * NEW_TOKENS / seconds
    results["peak_generate_bytes"] = _common.peak_rss()

    ids = torch.tensor(_prompts(1, ENCODER_TOKENS, vocabulary)).long()
    with torch.no_grad():
        model.model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
        results["encoder_512_s"], _ = _timed(
            lambda: model.model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)), repeats=3
        )

    batch, encoder_length, decoder_length = TRAIN_SHAPE
    encoder_ids = torch.tensor(_prompts(batch, encoder_length, vocabulary)).long()
    labels = torch.tensor(_prompts(batch, decoder_length, vocabulary)).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def train_step():
        optimizer.zero_grad()
        loss = model(input_ids=encoder_ids, attention_mask=torch.ones_like(encoder_ids), labels=labels).loss
        loss.backward()
        optimizer.step()

    train_step()
    results["train_step_s"], _ = _timed(train_step, repeats=2)
    return results


def child(implementation, checkpoint):
    # The baseline is taken after the frameworks are imported: peaks count
    # what loading and running the model add.
    if implementation == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    else:
        import jax
        import keras_hub  # noqa: F401 (imports keras and tensorflow)

        import keras_t5gemma  # noqa: F401

        jax.numpy.zeros(1).block_until_ready()  # starts the XLA client
    baseline = _common.current_rss()
    started = time.perf_counter()
    runner = {"keras_t5gemma": run_keras_t5gemma, "keras_hub": run_keras_hub, "transformers": run_transformers}
    results = runner[implementation](checkpoint)
    results["baseline_bytes"] = baseline
    results["total_s"] = time.perf_counter() - started
    print("RESULTS " + json.dumps(results))


# === Parent ===


def decode_bytes_per_step(config):
    """Weight bytes a batch-1 decode step reads: decoder layers, final norm, and the tied table."""
    decoder = config["decoder"]
    hidden, heads, kv_heads = decoder["hidden_size"], decoder["num_attention_heads"], decoder["num_key_value_heads"]
    head_dim, intermediate = decoder.get("head_dim", 256), decoder["intermediate_size"]
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads) + 2 * head_dim
    layer = attention + 3 * hidden * intermediate + 4 * hidden
    if _is_first_generation(config):
        # The separate cross-attention block: its query and output
        # projections and two norms (the encoder keys/values are computed once).
        layer += 2 * hidden * head_dim * heads + 2 * hidden
    return 4 * (decoder["num_hidden_layers"] * layer + hidden + decoder["vocab_size"] * hidden)


def run_child(implementation, checkpoint, environment):
    command = [sys.executable, __file__, "--child", implementation, "--checkpoint", str(checkpoint)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    for line in result.stdout.splitlines():
        if line.startswith("RESULTS "):
            results = json.loads(line[len("RESULTS ") :])
            print(f"{implementation}: {results}", file=sys.stderr)
            return results
    print(f"{implementation} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}", file=sys.stderr)
    return None


def report(name, config, results, bandwidth):
    rows = [
        ("encoder 512 tokens (ms)", "encoder_512_s", 1000, False),
        ("decode tok/s, batch 1", "decode_tokens_per_s_b1", 1, True),
        ("decode tok/s, batch 8", "decode_tokens_per_s_b8", 1, True),
        ("first call (s)", "first_call_s", 1, False),
        ("train step b4 256/64 (ms)", "train_step_s", 1000, False),
        ("weights (GiB)", "weight_bytes", 1 / 2**30, False),
        ("peak memory, loading (GiB)", "load_memory", 1 / 2**30, False),
        ("peak memory, generate (GiB)", "generate_memory", 1 / 2**30, False),
        ("peak generate memory / weights", "memory_ratio", 1, False),
    ]
    for values in results.values():
        if values:
            values["load_memory"] = values["peak_load_bytes"] - values["baseline_bytes"]
            values["generate_memory"] = values["peak_generate_bytes"] - values["baseline_bytes"]
            values["memory_ratio"] = values["generate_memory"] / values["weight_bytes"]
    names = [n for n in IMPLEMENTATIONS if results.get(n)]
    header = "| metric | " + " | ".join(names) + " | ours/keras_hub | ours/transformers |"
    lines = [f"### {name}", "", header, "|" + "---|" * (len(names) + 3)]
    ours = results.get("keras_t5gemma") or {}
    for label, key, scale, higher_is_better in rows:
        cells = [f"{results[n][key] * scale:.3g}" for n in names]
        ratios = []
        for peer in ("keras_hub", "transformers"):
            if ours and results.get(peer):
                ratio = ours[key] / results[peer][key] if higher_is_better else results[peer][key] / ours[key]
                ratios.append(f"{ratio:.2f}x")
            else:
                ratios.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines.append("")
    lines.append(
        "Ratios: > 1 means keras_t5gemma is better (faster, or less memory). "
        "Weights as each implementation stores them."
    )
    if ours:
        step_bytes = decode_bytes_per_step(config)
        roofline = bandwidth / step_bytes
        lines.append(
            f"Decode roofline (batch 1): {step_bytes / 1e9:.3f} GB of weights per step / {bandwidth / 1e9:.1f} GB/s "
            f"measured = {roofline:.1f} steps/s; keras_t5gemma reaches "
            f"{ours['decode_tokens_per_s_b1'] / roofline:.0%} of it."
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        return child(args.child, args.checkpoint)

    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    bandwidth = _common.memory_bandwidth()
    print(f"CPU threads: {os.cpu_count()}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    for name in args.configs:
        config = CONFIGS[name]()
        with tempfile.TemporaryDirectory() as directory:
            current, earlier = _common.write_random_checkpoint(config, directory)
            results = {}
            for implementation in args.implementations:
                checkpoint = (earlier or current) if implementation == "keras_hub" else current
                results[implementation] = run_child(implementation, checkpoint, environment)
        print(report(name, config, results, bandwidth))
        print(flush=True)


if __name__ == "__main__":
    main()
