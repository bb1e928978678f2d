"""One training step: keras_t5gemma against KerasHub 0.32 and transformers, interleaved.

    python benchmarks/train_step.py --config 270m --rounds 2 --steps 3
    python benchmarks/train_step.py --config tiny --rounds 3 --steps 5   # quick

The step is batch 4, 256 encoder / 64 decoder tokens, float32, next-token
cross-entropy over the whole vocabulary, AdamW (Keras' `AdamW(1e-5)` for the
Keras ports, `torch.optim.AdamW(lr=1e-5)` for `transformers`). All three
start from one random checkpoint written by `benchmark_generate.py`'s
`write_random_checkpoint` (KerasHub reads a text-only copy: its vision model cannot
train without images; `transformers` and keras_t5gemma hold the vision tower,
which gets no update: `transformers` skips parameters without gradients,
keras_t5gemma freezes it by default). `keras_t5gemma_lora` is keras_t5gemma
with `enable_lora(8)`.

Each implementation runs in its own process (a 270m model with its optimizer
state takes ~8 GB, too much for all at once on a small machine); one round
starts each of them in turn (A, B, C, A, B, C, ...), and each process times
`--steps` steps after one warm-up step (the compile). The report gives the
median over rounds of each process's median step, tokens/s (encoder plus
decoder tokens), achieved FLOP/s (model FLOPs: 6 per parameter per token it
passes, plus attention) next to the machine's float32 matmul peak measured
before and after, and the ratio of keras_t5gemma to each peer. With
`--profile`, keras_t5gemma's step is also split into data (the bundled
preset's preprocessor on string pairs), forward, backward and optimizer.

An implementation name ending in `+huge_pages` runs that implementation with
glibc's transparent huge pages for large allocations
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, set before its process starts), so
that `keras_t5gemma keras_t5gemma+huge_pages` is an interleaved A/B of the
setting. `--loss-chunk-tokens 128 256` instead times keras_t5gemma's step with
each number of decoder states per loss chunk, in one process (one compiled
step per size, alternating, `--rounds` x `--steps`).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402
from _common import write_random_checkpoint  # noqa: E402
from benchmark_generate import CONFIGS  # noqa: E402

ROOT = Path(__file__).parents[1]
IMPLEMENTATIONS = ("keras_t5gemma", "keras_hub", "transformers", "keras_t5gemma_lora", "keras_t5gemma_plain_loss")
HUGE_PAGES_SUFFIX = "+huge_pages"
BATCH, ENCODER_TOKENS, DECODER_TOKENS = 4, 256, 64


def matmul_peak(size=2048, repeats=5):
    """float32 matmul FLOP/s on this machine (median of `repeats`, jitted JAX)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times)


def train_flops(config):
    """Model FLOPs of one training step: 3x the forward's multiply-adds, times two."""
    text, decoder = config["encoder"]["text_config"], config["decoder"]

    def layer_params(c):
        d, heads, kv, hd, ff = (
            c["hidden_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["head_dim"],
            c["intermediate_size"],
        )
        return d * hd * (2 * heads + 2 * kv) + 3 * d * ff

    s, t = ENCODER_TOKENS, DECODER_TOKENS
    encoder = text["num_hidden_layers"] * (
        layer_params(text) * s + 2 * s * s * text["num_attention_heads"] * text["head_dim"]
    )
    # Decoder layers also project the encoder output to keys/values and attend over self + cross keys.
    heads, kv, hd, d = (
        decoder["num_attention_heads"],
        decoder["num_key_value_heads"],
        decoder["head_dim"],
        decoder["hidden_size"],
    )
    cross = 2 * d * kv * hd * s + 2 * t * (t + s) * heads * hd
    decoder_flops = decoder["num_hidden_layers"] * (layer_params(decoder) * t + cross)
    head = decoder["vocab_size"] * d * t
    return 6 * BATCH * (encoder + decoder_flops + head)


def _batch(vocabulary):
    import numpy as np

    rng = np.random.default_rng(0)
    encoder = rng.integers(3, min(vocabulary, 255_000), (BATCH, ENCODER_TOKENS)).astype("int32")
    decoder = rng.integers(3, min(vocabulary, 255_000), (BATCH, DECODER_TOKENS)).astype("int32")
    return encoder, decoder


def _time_steps(step, steps):
    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"first_step_s": first, "step_s": times}


def _keras_step(seq_2_seq_lm, vocabulary, steps):
    import numpy as np

    encoder, decoder = _batch(vocabulary)
    x = _common.training_inputs(encoder, decoder)
    _common.compile_for_training(seq_2_seq_lm)
    trainable = sum(int(np.prod(w.shape)) for w in seq_2_seq_lm.trainable_weights)
    # Under `jax.jit` the Python `train_step` runs only when the step is traced.
    traces = []
    train_step = seq_2_seq_lm.train_step
    seq_2_seq_lm.train_step = lambda *args: traces.append(1) or train_step(*args)
    results = _time_steps(lambda: seq_2_seq_lm.train_on_batch(x, decoder), steps)
    results["traces"] = len(traces)
    results["trainable_parameters"] = trainable
    return results, x, decoder


def _profile(seq_2_seq_lm, x, y, repeats=2):
    """keras_t5gemma's step split into data, forward, backward, optimizer, and the LM head's share.

    Forward and backward are jitted separately on the plain loss path (the
    chunked path computes the head's gradients in its forward pass); the
    head is timed alone (logits and loss over the decoder states, forward
    and backward) on the plain and the chunked path.
    """
    import jax
    import keras
    import numpy as np

    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma.models.chunked_loss import chunked_cross_entropy
    from keras_t5gemma.models.chunked_loss import default_chunk_tokens

    model = seq_2_seq_lm
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    optimizer_state = [v.value for v in model.optimizer.variables]
    metrics = [v.value for v in model.metrics_variables]

    def loss(trainable, frozen):
        return model.compute_loss_and_updates(
            trainable, frozen, metrics, x, y, None, training=True, optimizer_variables=optimizer_state
        )[0]

    def timed(function):
        jax.block_until_ready(function())
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(function())
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    model.chunked_loss = False
    forward = jax.jit(loss)
    gradient = jax.jit(jax.grad(loss))
    apply = jax.jit(
        lambda optimizer_state, grads, trainable: model.optimizer.stateless_apply(optimizer_state, grads, trainable)
    )
    results = {"forward_s": timed(lambda: forward(trainable, frozen))}
    forward_backward = timed(lambda: gradient(trainable, frozen))
    results["backward_s"] = forward_backward - results["forward_s"]
    grads = gradient(trainable, frozen)
    results["optimizer_s"] = timed(lambda: apply(optimizer_state, grads, trainable))
    model.chunked_loss = True

    # The LM head alone: decoder states (B * T, D) to the mean loss, with gradients to the states and table.
    embedding = model.backbone.token_embedding
    table = embedding.table.embeddings
    rng = np.random.default_rng(0)
    hidden = jax.numpy.asarray(rng.normal(size=(BATCH * DECODER_TOKENS, table.shape[1])).astype("float32"))
    labels = jax.numpy.asarray(np.asarray(y).reshape(-1))
    weights = jax.numpy.ones(labels.shape, "float32")
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def plain_head(hidden, table_value):
        with keras.StatelessScope(state_mapping=[(table, table_value)]):
            return cross_entropy(labels, embedding.logits(hidden))

    def chunked_head(hidden, table_value):
        chunk = default_chunk_tokens(embedding.vocabulary_size)
        total = chunked_cross_entropy(embedding, [table_value], hidden, labels, weights, chunk)[0]
        return total / labels.shape[0]

    for name, head in (("head_plain_s", plain_head), ("head_chunked_s", chunked_head)):
        step = jax.jit(jax.value_and_grad(head, argnums=(0, 1)))
        results[name] = timed(lambda: step(hidden, table.value))

    # Data: the bundled preset's preprocessor over string pairs of about the step's lengths.
    preprocessor = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits").preprocessor
    preprocessor.encoder_sequence_length, preprocessor.decoder_sequence_length = ENCODER_TOKENS, DECODER_TOKENS
    words = " ".join(str(i % 10) for i in range(ENCODER_TOKENS))
    pairs = {"encoder_text": [words] * BATCH, "decoder_text": [words[: 2 * DECODER_TOKENS]] * BATCH}
    results["data_s"] = timed(lambda: keras.tree.map_structure(keras.ops.convert_to_numpy, preprocessor(pairs)))
    return results


def load_keras_t5gemma(checkpoint):
    """keras_t5gemma's `T5Gemma2Seq2SeqLM` from the benchmark's Hugging Face checkpoint folder (no preprocessor)."""
    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
    from keras_t5gemma.utils.preset_utils import get_preset_loader

    return T5Gemma2Seq2SeqLM(get_preset_loader(str(checkpoint)).load_backbone(T5Gemma2Backbone, True))


def run_keras_t5gemma(checkpoint, steps, lora=False, profile=False, chunked_loss=True):
    seq_2_seq_lm = load_keras_t5gemma(checkpoint)
    backbone = seq_2_seq_lm.backbone
    seq_2_seq_lm.chunked_loss = chunked_loss
    if lora:
        backbone.enable_lora(8)
    results, x, y = _keras_step(seq_2_seq_lm, backbone.vocabulary_size, steps)
    if profile:
        results["profile"] = _profile(seq_2_seq_lm, x, y)
    return results


def run_keras_hub(checkpoint, steps):
    from keras_hub.models import T5Gemma2Backbone
    from keras_hub.models import T5Gemma2Seq2SeqLM

    backbone = T5Gemma2Backbone.from_preset(str(checkpoint))
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone=backbone, preprocessor=None)
    return _keras_step(seq_2_seq_lm, backbone.vocabulary_size, steps)[0]


def run_transformers(checkpoint, steps):
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    model = T5Gemma2ForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    encoder, labels = (torch.tensor(a).long() for a in _batch(model.config.decoder.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        optimizer.zero_grad()
        loss = model(input_ids=encoder, attention_mask=torch.ones_like(encoder), labels=labels).loss
        loss.backward()
        optimizer.step()

    results = _time_steps(step, steps)
    results["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return results


def run_loss_chunk_sizes(checkpoint, chunk_sizes, rounds, steps):
    """keras_t5gemma's step per loss chunk size, one process: {size: [step seconds]}, alternating sizes."""
    seq_2_seq_lm = load_keras_t5gemma(checkpoint)
    backbone = seq_2_seq_lm.backbone
    encoder, decoder = _batch(backbone.vocabulary_size)
    x = _common.training_inputs(encoder, decoder)
    _common.compile_for_training(seq_2_seq_lm)
    functions = {}
    for size in chunk_sizes:
        # `jax.jit` traces on the first call, which reads the size set here.
        seq_2_seq_lm.loss_chunk_tokens = size
        seq_2_seq_lm.make_train_function(force=True)
        functions[size] = seq_2_seq_lm.train_function
        seq_2_seq_lm.train_on_batch(x, decoder)
    times = {size: [] for size in chunk_sizes}
    for _ in range(rounds * steps):
        for size, function in functions.items():
            seq_2_seq_lm.train_function = function
            started = time.perf_counter()
            seq_2_seq_lm.train_on_batch(x, decoder)
            times[size].append(time.perf_counter() - started)
    return {"loss_chunk_step_s": times}


def child(implementation, checkpoints, steps, profile, loss_chunk_tokens=None, rounds=1):
    current, earlier = checkpoints
    if loss_chunk_tokens:
        results = run_loss_chunk_sizes(current, loss_chunk_tokens, rounds, steps)
    elif implementation == "keras_t5gemma":
        results = run_keras_t5gemma(current, steps, profile=profile)
    elif implementation == "keras_t5gemma_lora":
        results = run_keras_t5gemma(current, steps, lora=True)
    elif implementation == "keras_t5gemma_plain_loss":
        results = run_keras_t5gemma(current, steps, chunked_loss=False)
    elif implementation == "keras_hub":
        results = run_keras_hub(earlier, steps)
    else:
        results = run_transformers(current, steps)
    # Peak resident memory of this process (loading included), in GB.
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(results), flush=True)


def run_child(implementation, directory, steps, profile, extra=()):
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    if implementation.endswith(HUGE_PAGES_SUFFIX):
        # As `keras-t5gemma` starts itself (`keras_t5gemma/utils/quiet_start.py`); not imported, to keep
        # this parent process free of Keras.
        implementation = implementation[: -len(HUGE_PAGES_SUFFIX)]
        environment["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    command = [sys.executable, __file__, "--child", implementation, "--checkpoints", directory, "--steps", str(steps)]
    if profile:
        command.append("--profile")
    command += list(extra)
    output = subprocess.run(command, env=environment, capture_output=True, text=True)
    for line in output.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{implementation} failed:\n{output.stderr[-4000:]}")


def compare_loss_chunk_sizes(config, args):
    """`--loss-chunk-tokens`: keras_t5gemma's step per chunk size, interleaved in one process."""
    sizes = [str(size) for size in args.loss_chunk_tokens]
    extra = ["--rounds", str(args.rounds), "--loss-chunk-tokens", *sizes]
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(config, directory)
        times = run_child("keras_t5gemma", directory, args.steps, False, extra)["loss_chunk_step_s"]
    print(f"\n{args.config}: keras_t5gemma's step by loss chunk size, one process, sizes alternating")
    for size, steps in times.items():
        print(f"{size:>6} decoder states per chunk: median {statistics.median(steps):.2f} s over {len(steps)} steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="270m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up")
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS + tuple(name + HUGE_PAGES_SUFFIX for name in IMPLEMENTATIONS),
        default=list(IMPLEMENTATIONS[:4]),
    )
    parser.add_argument("--profile", action="store_true", help="split keras_t5gemma's step (own process, first)")
    parser.add_argument("--loss-chunk-tokens", type=int, nargs="+", help="time these loss chunk sizes instead")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        directory = Path(args.checkpoints)
        checkpoints = (directory / "current", directory / "earlier")
        child(args.child, checkpoints, args.steps, args.profile, args.loss_chunk_tokens, args.rounds)
        return

    config = CONFIGS[args.config]()
    if args.loss_chunk_tokens:
        return compare_loss_chunk_sizes(config, args)
    peak_before = matmul_peak()
    flops = train_flops(config)
    runs = {name: [] for name in args.implementations}
    profile = None
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(config, directory)
        if args.profile:
            # Its own process (one compile step, then the pieces), before the timed rounds.
            try:
                profile = run_child("keras_t5gemma", directory, 0, True)["profile"]
                print(f"profile: {json.dumps(profile)}", flush=True)
            except RuntimeError as error:
                print(f"profile failed: {error}", flush=True)
        for round_index in range(args.rounds):
            for name in args.implementations:
                result = run_child(name, directory, args.steps, False)
                runs[name].append(result)
                print(f"round {round_index + 1} {name}: {json.dumps(result)}", flush=True)
    peak_after = matmul_peak()
    peak = statistics.median([peak_before, peak_after])
    tokens = BATCH * (ENCODER_TOKENS + DECODER_TOKENS)
    print(
        f"\n{args.config}: batch {BATCH}, {ENCODER_TOKENS}/{DECODER_TOKENS} tokens, float32, AdamW; "
        f"{args.rounds} rounds x {args.steps} steps; model FLOPs per step {flops / 1e9:.0f} G; "
        f"float32 matmul peak {peak_before / 1e9:.0f} / {peak_after / 1e9:.0f} GFLOP/s (before / after)"
    )
    medians = {
        name: statistics.median(statistics.median(r["step_s"]) for r in results) for name, results in runs.items()
    }
    header = ("implementation", "step (s)", "tokens/s", "GFLOP/s", "of peak", "trainable", "first (s)", "peak GB")
    print(f"{header[0]:<26}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, step in medians.items():
        first = statistics.median(r["first_step_s"] for r in runs[name])
        print(
            f"{name:<26}{step:>12.3f}{tokens / step:>12.0f}{flops / step / 1e9:>12.1f}{flops / step / peak:>12.1%}"
            f"{runs[name][0]['trainable_parameters']:>12,}{first:>12.1f}"
            f"{max(r['peak_rss_gb'] for r in runs[name]):>12.1f}"
        )
    if "keras_t5gemma" in medians:
        for peer in ("keras_hub", "transformers", "keras_t5gemma_lora", "keras_t5gemma_plain_loss"):
            if peer in medians:
                print(f"keras_t5gemma step speed / {peer}: {medians[peer] / medians['keras_t5gemma']:.2f}x")
        traces = [r.get("traces") for r in runs["keras_t5gemma"]]
        print(f"keras_t5gemma train function traces per process: {traces}")
    if profile:
        print("keras_t5gemma profile (s): " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in profile.items()))


if __name__ == "__main__":
    main()
