"""`keras-t5gemma embed`: pooled encoder vectors, printed or saved (`data.write_vectors`)."""

import numpy as np

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import POOLINGS
from keras_t5gemma.commands.common import add_encoding
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.commands.common import texts_of


def add_parser(commands):
    parser = commands.add_parser(
        "embed",
        help="embed texts with the encoder (pooled, normalised vectors)",
        description="Prints each text's embedding (and their cosine similarities), or saves them with --output "
        '(.npy: a (texts, hidden) float32 array; .jsonl: one {"text", "embedding"} object per line).',
    )
    add_preset(parser)
    parser.add_argument("texts", nargs="*", help="texts (quote each one)")
    parser.add_argument("--file", help="a text file, one text per line")
    add_encoding(parser)
    parser.add_argument("--pooling", default="mean", choices=POOLINGS, help=DEFAULT)
    parser.add_argument("--no-normalize", action="store_true", help="keep the vectors' norms")
    parser.add_argument("--batch-size", type=positive_int, default=32, help=DEFAULT)
    parser.add_argument("--output", help="a .npy or .jsonl file to save to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.set_defaults(run=run_embed)


def run_embed(args):
    from keras_t5gemma.data import check_vectors_file
    from keras_t5gemma.data import write_vectors
    from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder

    texts = texts_of(args, "texts")
    if args.output:
        check_vectors_file(args.output, args.overwrite)
    embedder = T5Gemma2Embedder.from_preset(args.preset, pooling=args.pooling, normalize=not args.no_normalize)
    vectors = np.asarray(embedder.predict(texts, batch_size=args.batch_size, verbose=0), "float32")
    if args.output:
        write_vectors(args.output, texts, vectors, overwrite=args.overwrite)
        say(f"Saved {vectors.shape[0]} embeddings of size {vectors.shape[1]} to {args.output}.")
    else:
        with np.printoptions(precision=4, suppress=True, threshold=12, edgeitems=4, linewidth=200):
            for text, vector in zip(texts, vectors):
                say(f"{text}\t{vector}")
    if 1 < len(texts) <= 10:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        say("cosine similarity:")
        for row, text in zip(unit @ unit.T, texts):
            say("  " + " ".join(f"{value:6.3f}" for value in row) + f"  {text}")
    return 0
