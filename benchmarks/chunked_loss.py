"""The fine-tuning loss over the vocabulary, by chunk size: time, page faults, peak memory.

    python benchmarks/chunked_loss.py                      # 270m head, 256 states
    python benchmarks/chunked_loss.py --rows 1024 --chunk-tokens 128 256 512 1024

One process (JAX), the 270m-270m tied head (262,144 x 640, float32) and
`--rows` decoder states (batch 4 x 64 decoder tokens = 256 in
`train_step.py`): the loss and its gradients to the states and to the table,
as `fit` computes them (`chunked_cross_entropy`), for each chunk size, plus
`plain` (the whole `(rows, V)` logits and Keras-style log-softmax, what the
plain path's loss does), each followed by the accuracy metric's argmax.
Implementations run interleaved (A, B, C, A, B, C, ...), one compiled
function each; the medians are printed.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocabulary", type=int, default=262144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from keras_t5gemma.layers.token_embedding import TokenEmbedding
    from keras_t5gemma.models.chunked_loss import chunked_cross_entropy
    from keras_t5gemma.models.chunked_loss import default_chunk_tokens

    embedding = TokenEmbedding(args.vocabulary, args.hidden, eoi_token_id=None)
    embedding.build()
    random = np.random.default_rng(0)
    hidden = jnp.asarray(random.normal(size=(args.rows, args.hidden)).astype("float32"))
    labels = jnp.asarray(random.integers(0, args.vocabulary, size=(args.rows,)).astype("int32"))
    weights = jnp.ones((args.rows,), "float32")
    table = [variable.value for variable in embedding.table.variables]

    def accuracy(logits):
        return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    def chunked(chunk_tokens):
        def loss(states, values):
            total, logits = chunked_cross_entropy(embedding, values, states, labels, weights, chunk_tokens)
            return total / args.rows, accuracy(logits)

        return loss

    def plain(states, values):
        with keras.StatelessScope(state_mapping=list(zip(embedding.table.variables, values))):
            logits = embedding.logits(states)
        log_probabilities = jax.nn.log_softmax(logits.astype("float32"), axis=-1)
        total = -jnp.sum(weights * jnp.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0])
        return total / args.rows, accuracy(logits)

    default = default_chunk_tokens(args.vocabulary)
    losses = {f"chunks of {n}" + (" (default)" if n == default else ""): chunked(n) for n in args.chunk_tokens}
    losses["plain"] = plain
    steps = {name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)) for name, loss in losses.items()}
    for step in steps.values():
        jax.block_until_ready(step(hidden, table))
    seconds = {name: [] for name in steps}
    faults = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            jax.block_until_ready(step(hidden, table))
            seconds[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    print(f"{args.rows} states, vocabulary {args.vocabulary}, width {args.hidden}, {args.rounds} interleaved rounds")
    print(f"{'':22s} {'median s':>9s} {'min s':>7s} {'page faults':>12s}")
    for name in steps:
        print(
            f"{name:22s} {np.median(seconds[name]):9.3f} {min(seconds[name]):7.3f} {int(np.median(faults[name])):12d}"
        )
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
