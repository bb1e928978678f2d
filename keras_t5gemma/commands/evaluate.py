"""`keras-t5gemma evaluate`: `keras_t5gemma.evaluation.evaluate` over a data file, a table of scores."""

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.evaluation import DEFAULT_METRICS
from keras_t5gemma.evaluation import INSTALL_EVAL
from keras_t5gemma.evaluation import METRICS


def add_parser(commands):
    parser = commands.add_parser(
        "evaluate",
        help="score a model's greedy answers on a JSONL or CSV file of input/target pairs",
        description="Generates an answer to every input (greedy, batched) and prints a table of scores against "
        "the targets: exact match, ROUGE-1/2/L (rouge-score), BLEU and chrF (sacrebleu), each 0-100. ROUGE, BLEU "
        f"and chrF need the eval extra: {INSTALL_EVAL}. On a multi-process JAX job (--multi-host), each "
        "process generates its part of the data and process 0 prints the table and writes --predictions. "
        "From Python: keras_t5gemma.evaluation.evaluate(...).",
    )
    add_preset(parser)
    parser.add_argument("data", help="a .jsonl or .csv file of input/target pairs (as fine-tune reads)")
    metrics = f"comma-separated, from {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)})"
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=metrics)
    predictions = "write each example's input, target and prediction to this .jsonl file"
    parser.add_argument("--predictions", metavar="OUT.jsonl", help=predictions)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="inputs per batch " + DEFAULT)
    length = "decoder length in tokens, <bos> included (default: the preset's)"
    parser.add_argument("--max-length", type=positive_int, help=length)
    parser.add_argument("--encoder-length", type=positive_int, help="encoder length in tokens (default: the preset's)")
    multi_host = "join the other processes of the job first (keras.distribution.initialize); each generates its part"
    parser.add_argument("--multi-host", action="store_true", help=multi_host)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args):
    from keras_t5gemma.evaluation import evaluate
    from keras_t5gemma.training.checkpoints import process_index

    result = evaluate(
        args.preset,
        args.data,
        metrics=args.metrics,
        batch_size=args.batch_size,
        max_length=args.max_length,
        encoder_length=args.encoder_length,
        predictions_path=args.predictions,
        overwrite=args.overwrite,
        multi_host=args.multi_host,
        progress=False if args.quiet else "auto",
    )
    rows, total = result.generated, len(result.predictions)
    if len(rows) < total:
        say(f"Process {process_index()} generated examples {rows.start + 1}-{rows.stop} of {total}.")
    if process_index() == 0:
        say(f"{args.preset} on {args.data}:\n{result.table()}")
        if args.predictions:
            say(f"Predictions written to {args.predictions}.")
    return 0
