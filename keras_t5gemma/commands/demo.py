"""`keras-t5gemma demo`: the main job (`training.demo.run_demo`)."""

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say


def add_parser(commands):
    parser = commands.add_parser(
        "demo",
        help="the main job: fine-tune the bundled model on a new operation, answers before/after",
        description="Loads the bundled preset (trained to reverse and sort digit sequences and name an image's "
        "colour), shows its answers, fine-tunes it briefly to `rotate` sequences ('rotate: 3 1 4' -> '1 4 3') "
        "while replaying the known tasks, and shows the answers again with correctness marks and held-out "
        "exact match. A few minutes on 2 CPU cores.",
    )
    add_preset(parser)
    parser.add_argument("--steps", type=positive_int, default=500, help="fine-tuning steps " + DEFAULT)
    parser.add_argument("--batch-size", type=positive_int, default=32, help=DEFAULT)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW rate " + DEFAULT)
    parser.add_argument("--eval-examples", type=positive_int, default=100, help="held-out prompts per group " + DEFAULT)
    parser.add_argument("--output", help="also save the fine-tuned model to this folder")
    parser.add_argument("--seed", type=int, default=0, help=DEFAULT)
    verbosity = "Keras fit verbosity (default: a progress bar on a terminal, else one line)"
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), help=verbosity)
    parser.set_defaults(run=run_demo)


def run_demo(args):
    """Before/after: teach the bundled model `rotate` by fine-tuning, print marked answers."""
    from keras_t5gemma.training.demo import run_demo as demo_run

    options = {name: getattr(args, name) for name in ("preset", "steps", "batch_size", "learning_rate", "seed")}
    verbose = "auto" if args.verbose is None else args.verbose
    demo_run(**options, eval_examples=args.eval_examples, output=args.output, verbose=verbose, say=say)
    return 0
