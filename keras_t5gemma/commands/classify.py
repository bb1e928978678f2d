"""`keras-t5gemma classify`: a classifier preset's classes for texts or words."""

import numpy as np

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import add_encoding
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.commands.common import texts_of


def add_parser(commands):
    parser = commands.add_parser(
        "classify",
        help="classify texts with a classifier preset (e.g. one from `fine-tune --task classify`)",
        description="Prints `text<TAB>class<TAB>probability` for each text, or with --tokens `word/class` "
        "for each word.",
    )
    add_preset(parser)
    parser.add_argument("texts", nargs="*", help="texts (quote each one)")
    parser.add_argument("--file", help="a text file, one text per line")
    add_encoding(parser)
    parser.add_argument("--tokens", action="store_true", help="a token classifier: one class per word")
    parser.add_argument("--batch-size", type=positive_int, default=32, help=DEFAULT)
    parser.set_defaults(run=run_classify)


def run_classify(args):
    """Prints each text's most likely class and its probability (or, with `--tokens`, each word's class)."""
    from keras_t5gemma.models.auto import classifier_class

    texts = texts_of(args, "texts")
    classifier = classifier_class(args.preset, per_word=args.tokens).from_preset(args.preset)
    names = classifier.labels or [str(i) for i in range(classifier.num_classes)]
    if args.tokens:
        for text, scores in zip(texts, classifier.predict_words(texts, batch_size=args.batch_size, verbose=0)):
            say(" ".join(f"{word}/{names[int(row.argmax())]}" for word, row in zip(text.split(), scores)))
        return 0
    logits = np.asarray(classifier.predict(texts, batch_size=args.batch_size, verbose=0), "float64")
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    for text, row in zip(texts, probabilities):
        say(f"{text}\t{names[int(row.argmax())]}\t{row.max():.3f}")
    return 0
