"""`python -m keras_t5gemma.serving [flags]`: `keras-t5gemma serve` without the rest of the command line.

Set `KERAS_BACKEND` (JAX recommended) in the environment: this package's
import picks the backend before this module runs.
"""

import argparse
import sys

from keras_t5gemma.serving.command import add_serve_parser


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_t5gemma.serving")
    serve = add_serve_parser(parser.add_subparsers(dest="command"))
    args = serve.parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
