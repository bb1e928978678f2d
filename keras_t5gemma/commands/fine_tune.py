"""`keras-t5gemma fine-tune`: `training.fine_tune.fine_tune` with the command's options."""

import inspect
import sys

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import add_encoding
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.training.fine_tune import TASKS


def add_parser(commands):
    parser = commands.add_parser(
        "fine-tune",
        help="fine-tune on a JSONL or CSV file of input/target pairs",
        description='Data: JSONL with one {"input": ..., "target": ...} object per line, or CSV with the '
        "columns input,target; an optional `image` field/column is an image path relative to the data file. "
        "Each run keeps a checkpoint of its training state after each epoch (sharded Orbax checkpoints, "
        "written by every process) in its own folder OUTPUT/runs/run_NNN/checkpoints/, and the final model "
        "in OUTPUT. With several devices it trains data-parallel, or on a --mesh; on a pod, run the same "
        "command on every host with --multi-host. From Python: keras_t5gemma.training.fine_tune.fine_tune(...).",
    )
    add_preset(parser)
    parser.add_argument("data", help="a .jsonl or .csv file (streamed: also .parquet, or a quoted glob of files)")
    add_encoding(parser, "the data file")
    task = (
        'generate: input/target pairs (T5Gemma2Seq2SeqLM); classify: JSONL {"input": ..., "label": ...} lines '
        '(T5Gemma2TextClassifier); classify-tokens: JSONL {"input": ..., "labels": [...]} lines, one label per '
        "whitespace-separated word (T5Gemma2TokenClassifier); a label is a class index or name " + DEFAULT
    )
    parser.add_argument("--task", default="generate", choices=TASKS, help=task)
    parser.add_argument("--output", default="t5gemma2_fine_tuned", help="folder to save to " + DEFAULT)
    parser.add_argument("--epochs", type=positive_int, default=3, help=DEFAULT)
    parser.add_argument("--batch-size", type=positive_int, default=16, help=DEFAULT)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW rate " + DEFAULT)
    parser.add_argument("--weight-decay", type=float, default=0.01, help=DEFAULT)
    lora = "train LoRA adapters of this rank instead of all weights (merged when saved)"
    parser.add_argument("--lora-rank", type=positive_int, help=lora)
    tower = "train the vision tower too (default: frozen, as T5Gemma 2 is fine-tuned)"
    parser.add_argument("--train-vision-tower", action="store_true", help=tower)
    mixed = (
        "compute in bfloat16 with float32 weights (Keras' mixed_bfloat16 policy; faster on TPUs and recent GPUs); "
        "the saved model keeps the policy"
    )
    parser.add_argument("--mixed-bfloat16", action="store_true", help=mixed)
    remat = "recompute each layer's activations in the backward pass instead of keeping them (less memory)"
    parser.add_argument("--remat", action="store_true", help=remat)
    for side, texts in (("encoder", "inputs"), ("decoder", "targets")):
        length = f"{side} tokens; longer {texts} are truncated (default: the preset's)"
        parser.add_argument(f"--{side}-length", type=positive_int, help=length)
    keep = "epoch checkpoints of this run to keep " + DEFAULT
    parser.add_argument("--keep-checkpoints", type=positive_int, default=2, help=keep)
    evaluate = (
        "held-out input/target pairs (.jsonl or .csv) to score after every epoch (greedy answers; see "
        "`keras-t5gemma evaluate`); the scores go to the run's history.csv and curves.png"
    )
    parser.add_argument("--eval", dest="eval_data", metavar="DATA", help=evaluate)
    metrics = "comma-separated, from exact, rouge, bleu, chrf (default: all; rouge, bleu and chrf need the eval extra)"
    parser.add_argument("--eval-metrics", default="exact,rouge,bleu,chrf", help=metrics)
    best = (
        "keep the checkpoint of the epoch with the best --eval score in OUTPUT/runs/run_NNN/best/: a score "
        "(exact, rouge1, rouge2, rougeL, bleu, chrf) or a metric (rouge: ROUGE-L)"
    )
    parser.add_argument("--keep-best", metavar="SCORE", help=best)
    resume = (
        "continue the last run in OUTPUT from its last complete checkpoint (the same settings; --epochs may grow); "
        "starts a run if OUTPUT is empty"
    )
    parser.add_argument("--resume", action="store_true", help=resume)
    overwrite = "write into a non-empty OUTPUT: a new run beside the earlier ones, and the final model's files"
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    mesh = "shard the model over a (batch, model) mesh of all devices, e.g. 2x4 (default: data parallel, JAX only)"
    parser.add_argument("--mesh", metavar="BATCHxMODEL", help=mesh)
    multi_host = (
        "join the other hosts of a pod first (keras.distribution.initialize: KERAS_DISTRIBUTION_* variables, or "
        "found by itself on a Cloud TPU pod)"
    )
    parser.add_argument("--multi-host", action="store_true", help=multi_host)
    stream = (
        "read DATA as a stream, never all in memory: shuffled in windows of --shuffle-buffer records, each process "
        "reading its shard, the position saved with each checkpoint so that --resume goes on with the next unseen "
        "example (default: streamed for a glob, a Parquet file or a file over 1 GiB; text pairs only)"
    )
    parser.add_argument("--stream", action="store_true", default=None, help=stream)
    shuffle = "records shuffled together when streaming " + DEFAULT
    parser.add_argument("--shuffle-buffer", type=positive_int, default=10_000, help=shuffle)
    every = "when streaming, also save a checkpoint every STEPS steps (default: after each epoch only)"
    parser.add_argument("--checkpoint-every", type=positive_int, metavar="STEPS", help=every)
    objective = (
        "continued pretraining on raw text instead of input/target pairs: DATA is .txt (a document per line) or "
        'JSONL {"text": ...} files (or a quoted glob), streamed; prefix-lm cuts each document in two, ul2 draws '
        "one of UL2's seven denoisers (span corruption and prefix LM) per document, as T5Gemma was adapted"
    )
    parser.add_argument("--objective", choices=("prefix-lm", "ul2"), help=objective)
    pack = (
        "pack several examples into each row of --encoder-length/--decoder-length tokens (greedy first fit; each "
        "example attends only to itself) instead of padding each to a row; --batch-size counts rows, the loss is "
        "averaged over target tokens (text pairs; streamed or --objective examples are packed as they come, each "
        "batch the next ones that fit, and --resume still sees each once per epoch; one process)"
    )
    parser.add_argument("--pack", action="store_true", help=pack)
    parser.add_argument("--seed", type=int, default=0, help="shuffling and initialisation (default: 0)")
    quiet = "no progress output (default: a progress bar on a terminal, else a line per epoch)"
    parser.add_argument("--quiet", action="store_true", help=quiet)
    parser.set_defaults(run=run_fine_tune)


def run_fine_tune(args):
    """`fine-tune`: `keras_t5gemma.training.fine_tune.fine_tune` with the command's options."""
    from keras_t5gemma.training.fine_tune import FineTuneInterrupted
    from keras_t5gemma.training.fine_tune import fine_tune

    # The options that `fine_tune` takes under the same names, and those it takes in other words.
    options = {name: value for name, value in vars(args).items() if name in inspect.signature(fine_tune).parameters}
    options.update(dtype="mixed_bfloat16" if args.mixed_bfloat16 else None, verbose=0 if args.quiet else "auto")
    try:
        result = fine_tune(**options, log=say)
    except FineTuneInterrupted as stop:
        advice = "; continue with the same command and --resume" if stop.checkpoint else ""
        print(f"keras-t5gemma: interrupted; {stop}{advice}", file=sys.stderr, flush=True)
        return 130
    if args.task != "generate":
        kind, flag = ("token classifier", " --tokens") if args.task == "classify-tokens" else ("classifier", "")
        say(f'Saved the {kind} to {args.output}; try `keras-t5gemma classify{flag} --preset {args.output} "..."`.')
    elif result.saved:
        say(f"Saved the fine-tuned model to {args.output}; use it with `--preset {args.output}`.")
    return 0
