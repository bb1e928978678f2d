"""The fine-tuning loss over the vocabulary, by chunk size: time, page faults, peak memory.

    python benchmarks/chunked_loss.py                      # 270m head, 256 states
    python benchmarks/chunked_loss.py --rows 1024 --chunk-tokens 128 256 512 1024
    python benchmarks/chunked_loss.py --plan               # XLA's buffer plan only

One process (JAX), the 270m-270m tied head (262,144 x 640, float32) and
`--rows` decoder states (batch 4 x 64 decoder tokens = 256 in
`train_step.py`): the mean loss and its gradients to the states and to the
table, and the accuracy metric's matches, as `fit` computes them
(`chunked_cross_entropy`: the mean's `1 / rows` in the weights, the argmax in
the chunk loop), for each chunk size; `... logits` the same with the logits
returned for the metric (what `fit` does when a metric other than the
accuracy is compiled); and `plain` (the whole `(rows, V)` logits and a
log-softmax, what the plain path's loss does, then the argmax). Implementations
run interleaved (A, B, C, A, B, C, ...), one compiled function each; the
medians are printed. `--plan` compiles only and prints XLA's temporary bytes
and the optimized program's `(V, D)`-shaped ops: the passes over the table's
gradient.
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
    parser.add_argument("--plan", action="store_true", help="compile only: XLA's temporaries and table-shaped ops")
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

    def matches(logits):
        return keras.ops.argmax(logits, axis=-1) == labels

    def chunked(chunk_tokens, predictions):
        def loss(states, values):
            mean, outputs = chunked_cross_entropy(
                embedding, values, states, labels, weights / args.rows, chunk_tokens, predictions
            )
            return mean, (outputs == labels) if predictions == "ids" else matches(outputs)

        return loss

    def plain(states, values):
        with keras.StatelessScope(state_mapping=list(zip(embedding.table.variables, values))):
            logits = embedding.logits(states)
        log_probabilities = jax.nn.log_softmax(logits.astype("float32"), axis=-1)
        total = -jnp.sum(weights * jnp.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0])
        return total / args.rows, matches(logits)

    default = default_chunk_tokens(args.vocabulary)
    losses = {}
    for n in args.chunk_tokens:
        name = f"chunks of {n}" + (" (default)" if n == default else "")
        losses[name] = chunked(n, "ids")
        losses[f"{name}, logits"] = chunked(n, "logits")
    losses["plain"] = plain
    steps = {name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)) for name, loss in losses.items()}
    if args.plan:
        return print_plans(steps, (hidden, table), f"f32[{args.vocabulary},{args.hidden}]")
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


def print_plans(steps, arguments, table_shape):
    """XLA's temporary bytes for each compiled step, and its table-sized ops (each a pass over such an array)."""
    import re

    print(f"{'':30s} {'temp MiB':>9s}  table-sized ops ({table_shape})")
    for name, step in steps.items():
        compiled = step.lower(*arguments).compile()
        table_ops, in_fusion = [], False
        for line in compiled.as_text().splitlines():
            header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
            if header:
                # The ops inside a fusion's computation run as that one fusion.
                in_fusion = "computation" in header.group(1)
                continue
            # `%name = f32[V,D]{1,0} opcode(...)`, outside parameters, tuple reads and bitcasts.
            found = re.match(r"\s*(?:ROOT )?%\S+ = " + re.escape(table_shape) + r"\S* (\S+?)\(", line)
            if found and not in_fusion and found.group(1) not in ("parameter", "get-tuple-element", "bitcast"):
                kind = re.search(r"calls=%(\w+?)_computation", line)
                table_ops.append(f"{found.group(1)} ({kind.group(1)})" if kind else found.group(1))
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        print(f"{name:30s} {temp:9.1f}  {len(table_ops)}: {', '.join(table_ops)}")


if __name__ == "__main__":
    main()
