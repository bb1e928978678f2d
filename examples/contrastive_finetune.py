"""Contrastive fine-tuning of T5Gemma 2 embeddings on (query, positive) pairs.

    python examples/contrastive_finetune.py t5gemma2_270m_270m --text-only
    python examples/contrastive_finetune.py ./my_preset --pairs pairs.tsv --epochs 3 --output ./tuned

`PRESET` is anything `T5Gemma2Embedder.from_preset` loads: a preset name, a
Keras preset folder (e.g. one saved from a `T5Gemma2Seq2SeqLM`), an `hf://`
handle or a local Hugging Face checkpoint. Only the encoder is built.

Training minimises InfoNCE with in-batch negatives: in a batch of B pairs,
each query must pick its own positive among the B positives, with cosine
similarities divided by `--temperature` (`ContrastivePairModel`). Pairs are
reshuffled every epoch so that each query meets new negatives. A pairs file
has one `query<TAB>positive` pair per line; without one a small demo set is
used. The script prints the loss per epoch and the recall@1 of each query
among all positives before and after, and saves the tuned embedder with
`--output`.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from contrastive_pair_model import ContrastivePairModel  # noqa: E402

from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder  # noqa: E402

DEMO_PAIRS = [
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How many legs does a spider have?", "Spiders have eight legs."),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare."),
    ("What is the boiling point of water?", "At sea level water boils at 100 degrees Celsius."),
    ("Which planet is the largest?", "Jupiter is the largest planet in the Solar System."),
    ("What do bees make?", "Honey bees produce honey and beeswax."),
    ("How fast does light travel?", "Light travels at about 300,000 kilometres per second."),
    ("What language is spoken in Brazil?", "The official language of Brazil is Portuguese."),
    ("What is photosynthesis?", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    ("What is the square root of 81?", "Nine times nine is 81, so its square root is 9."),
    ("Where is Mount Everest?", "Mount Everest lies in the Himalayas on the border of Nepal and China."),
    ("What gas do humans exhale?", "People breathe out carbon dioxide."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the largest ocean?", "The Pacific is the largest and deepest ocean."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
]


def read_pairs(path):
    """`(queries, positives)` from a file of `query<TAB>positive` lines."""
    queries, positives = [], []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not all(field.strip() for field in fields):
                raise ValueError(f"{path}:{number}: expected `query<TAB>positive`.")
            queries.append(fields[0])
            positives.append(fields[1])
    return queries, positives


def recall_at_1(embedder, queries, positives, batch_size):
    """The share of queries whose most similar positive (of all) is their own."""
    query_vectors = embedder.predict(queries, batch_size=batch_size, verbose=0)
    positive_vectors = embedder.predict(positives, batch_size=batch_size, verbose=0)
    best = np.argmax(query_vectors @ positive_vectors.T, axis=1)
    return float(np.mean(best == np.arange(len(queries))))


def pair_dataset(queries, positives, batch_size, seed):
    """Shuffled every epoch; the last partial batch is dropped (fewer negatives)."""
    pairs = tf.data.Dataset.from_tensor_slices({"query": queries, "positive": positives})
    pairs = pairs.shuffle(len(queries), seed=seed, reshuffle_each_iteration=True)
    return pairs.batch(batch_size, drop_remainder=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="preset name, Keras preset folder, hf:// handle or Hugging Face folder")
    parser.add_argument("--pairs", help="file of `query<TAB>positive` lines (default: a demo set)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch; B-1 negatives per query")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--pooling", default="mean", choices=("mean", "first", "last"))
    parser.add_argument("--text-only", action="store_true", help="Hugging Face checkpoints: skip the vision tower")
    parser.add_argument("--output", help="folder to save the tuned embedder to (a Keras preset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    queries, positives = read_pairs(args.pairs) if args.pairs else map(list, zip(*DEMO_PAIRS))
    if len(queries) < args.batch_size:
        raise SystemExit(f"{len(queries)} pairs do not fill one batch of {args.batch_size}.")

    load_kwargs = {"text_only": True} if args.text_only else {}
    embedder = T5Gemma2Embedder.from_preset(args.preset, pooling=args.pooling, normalize=True, **load_kwargs)
    embedder.preprocessor.sequence_length = args.sequence_length
    print(f"Recall@1 before: {recall_at_1(embedder, queries, positives, args.batch_size):.3f}")

    pairs = ContrastivePairModel(embedder, temperature=args.temperature)
    pairs.compile(optimizer=keras.optimizers.AdamW(args.learning_rate))
    history = pairs.fit(
        pair_dataset(queries, positives, args.batch_size, args.seed), epochs=args.epochs, shuffle=False, verbose=2
    )
    print("Loss per epoch:", ", ".join(f"{loss:.4f}" for loss in history.history["loss"]))
    print(f"Recall@1 after: {recall_at_1(embedder, queries, positives, args.batch_size):.3f}")

    if args.output:
        embedder.save_to_preset(args.output)
        print(f"Saved the tuned embedder to {args.output}")


if __name__ == "__main__":
    main()
