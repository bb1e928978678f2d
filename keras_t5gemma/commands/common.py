"""What the subcommands share: the user-error type, argument types, the preset option, printing."""

import argparse
import re

from keras_t5gemma.data import DEFAULT_ENCODING
from keras_t5gemma.data import read_lines
from keras_t5gemma.training.fine_tune import DEFAULT_PRESET

EXPORT_FORMATS = ("onnx", "transformers", "keras-hub")
POOLINGS = ("mean", "first", "last")
DEFAULT = "(default: %(default)s)"


class CommandError(Exception):
    """A user error: printed as one `error:` line, exit status 2."""


def positive_int(text):
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def one_line(error):
    """An error's message on one line, without the frame Keras puts around errors raised in a layer."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        return lines[1]
    return " ".join(lines)


def say(*args, **kwargs):
    print(*args, **kwargs, flush=True)


def texts_of(args, what):
    """The texts given as arguments (`args.<what>`), then the lines of `--file`."""
    encoding = getattr(args, "encoding", DEFAULT_ENCODING)
    texts = list(getattr(args, what)) + (read_lines(args.file, encoding) if args.file else [])
    if not texts:
        raise CommandError(f"give {what} as arguments or with --file")
    return texts


def add_encoding(parser, files="--file"):
    """`--encoding`: the text encoding of the command's text files."""
    parser.add_argument(
        "--encoding",
        default=DEFAULT_ENCODING,
        help=f"text encoding of {files}, e.g. latin-1, cp1252, utf-16 (default: %(default)s; a byte-order mark is "
        "dropped)",
    )


def add_preset(parser):
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="preset name, folder written by save_to_preset / fine-tune, hf://org/name handle, or Hugging Face "
        "checkpoint folder (default: %(default)s, bundled)",
    )
