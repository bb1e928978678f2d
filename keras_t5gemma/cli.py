"""The `keras-t5gemma` command (also `python -m keras_t5gemma`).

    keras-t5gemma demo                                  # fine-tune the bundled model, before/after
    keras-t5gemma generate "reverse: 1 2 3"; keras-t5gemma generate "color:" --image photo.png
    keras-t5gemma fine-tune data.jsonl --output my_model --epochs 3 --lora-rank 4
    keras-t5gemma embed "sort: 1 2" "sort: 2 1" --output vectors.npy
    keras-t5gemma classify "1 2 3" "3 1 2" --preset my_classifier   # from fine-tune --task classify
    keras-t5gemma convert hf://google/t5gemma-2-270m-270m ./t5gemma2_270m_270m
    keras-t5gemma export digits_onnx --format onnx --quantize int8   # or --format transformers
    keras-t5gemma presets

A shell: each subcommand is a module of `keras_t5gemma.commands` (its parser
and a `run(args)` calling the library: `training.fine_tune`, `data`, the
models, `serving`); this module builds the parser and turns errors into exit
statuses.

`--preset` takes a bundled or released preset name, a folder written by
`save_to_preset` (or by `fine-tune`), an `hf://org/name` handle, or a local
Hugging Face checkpoint folder. User errors (a missing or damaged file, a bad
data line or prompt, an unknown preset, an output folder that is not empty, no
network for an `hf://` handle) print one `error:` line and exit with status 2;
other failures while loading or running a model exit with status 1. Nothing
the command did not write is overwritten without `--overwrite`.
"""

import argparse
import os
import sys

from keras_t5gemma.commands import SUBCOMMANDS
from keras_t5gemma.commands.common import CommandError
from keras_t5gemma.commands.common import one_line
from keras_t5gemma.utils.loading import QUIET_VARIABLE


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-t5gemma",
        description="T5Gemma 2 (Gemma 3 encoder-decoder, text and images) in Keras 3: a demo, generation, "
        "fine-tuning, embeddings and checkpoint conversion. Runs on the bundled tiny preset by default.",
        epilog="Run `keras-t5gemma COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(commands)
    for command in commands.choices.values():
        try:
            command.add_argument("--quiet", action="store_true", help="no progress bars (loading included)")
        except argparse.ArgumentError:
            pass  # the command has its own --quiet (fine-tune, evaluate): it silences the loading bar too
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit:  # --help, or argparse's own usage errors
            return exit.code
        if args.command is None:
            parser.print_help()
            return 2
        if args.quiet:
            os.environ[QUIET_VARIABLE] = "1"
        return args.run(args)
    except CommandError as error:
        print(f"keras-t5gemma: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ImportError) as error:
        # A damaged or missing file, a bad input, an unreachable hub: the user's to fix.
        print(f"keras-t5gemma: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        print(f"keras-t5gemma: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
