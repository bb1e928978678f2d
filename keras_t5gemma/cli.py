"""The `keras-t5gemma` command (also `python -m keras_t5gemma`).

    keras-t5gemma demo                                  # fine-tune the bundled model, before/after
    keras-t5gemma generate "reverse: 1 2 3"; keras-t5gemma generate "color:" --image photo.png
    keras-t5gemma fine-tune data.jsonl --output my_model --epochs 3 --lora-rank 4
    keras-t5gemma embed "sort: 1 2" "sort: 2 1" --output vectors.npy
    keras-t5gemma classify "1 2 3" "3 1 2" --preset my_classifier   # from fine-tune --task classify
    keras-t5gemma convert hf://google/t5gemma-2-270m-270m ./t5gemma2_270m_270m
    keras-t5gemma export digits_onnx --format onnx --quantize int8   # or --format transformers
    keras-t5gemma presets

Each subcommand is a parser function (`_add_NAME_parser`, registered with
`@subcommand`) and a `run_NAME(args)`; the work is done by the library
(`keras_t5gemma.training.fine_tune`, `keras_t5gemma.data`, the models).

`--preset` takes a bundled or released preset name, a folder written by
`save_to_preset` (or by `fine-tune`), an `hf://org/name` handle, or a local
Hugging Face checkpoint folder. User errors (a missing or damaged file, a bad
data line or prompt, an unknown preset, an output folder that is not empty, no
network for an `hf://` handle) print one `error:` line and exit with status 2;
other failures while loading or running a model exit with status 1. Nothing
the command did not write is overwritten without `--overwrite`.
"""

import argparse
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

import keras
import numpy as np

from keras_t5gemma import demo
from keras_t5gemma.data import read_lines
from keras_t5gemma.models.t5gemma2_tokenizer import START_OF_IMAGE_PIECE as IMAGE_MARKER
from keras_t5gemma.training.fine_tune import DEFAULT_PRESET
from keras_t5gemma.training.fine_tune import TASKS
from keras_t5gemma.training.fine_tune import fit_verbosity
from keras_t5gemma.training.fine_tune import load_image
from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm  # noqa: F401 (a name of this module since 0.1)
from keras_t5gemma.training.fine_tune import with_image_markers

SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam")
EXPORT_FORMATS = ("onnx", "transformers")
POOLINGS = ("mean", "first", "last")
DEFAULT = "(default: %(default)s)"


class CommandError(Exception):
    """A user error: printed as one `error:` line, exit status 2."""


# === Helpers ===


def _positive_int(text):
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def _one_line(error):
    """An error's message on one line, without the frame Keras puts around errors raised in a layer."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        return lines[1]
    return " ".join(lines)


def _say(*args, **kwargs):
    print(*args, **kwargs, flush=True)


def _texts(args, what):
    """The texts given as arguments (`args.<what>`), then the lines of `--file`."""
    texts = list(getattr(args, what)) + (read_lines(args.file) if args.file else [])
    if not texts:
        raise CommandError(f"give {what} as arguments or with --file")
    return texts


def _add_preset(parser):
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="preset name, folder written by save_to_preset / fine-tune, hf://org/name handle, or Hugging Face "
        "checkpoint folder (default: %(default)s, bundled)",
    )


def make_sampler(name, temperature=1.0, top_k=5, top_p=0.9, num_beams=4, seed=None):
    """The `sampler` argument of `compile` for `--sampler NAME`.

    `"greedy"` is passed by name, so that the command line decodes exactly as
    `compile(sampler="greedy")` does (`ArgmaxSampler`).
    """
    from keras_hub import samplers

    if name == "greedy":
        return "greedy"
    if name == "top_k":
        return samplers.TopKSampler(k=top_k, seed=seed, temperature=temperature)
    if name == "top_p":
        return samplers.TopPSampler(p=top_p, seed=seed, temperature=temperature)
    if name == "random":
        return samplers.RandomSampler(seed=seed, temperature=temperature)
    return samplers.BeamSampler(num_beams=num_beams)


# === Subcommands ===

# The functions that add the subcommands, in the order `--help` lists them.
SUBCOMMANDS = []


def subcommand(add_parser):
    """Registers `add_parser(commands)`, which adds one subcommand to `commands` (`argparse`'s subparsers) and
    sets its `run`: a function of the parsed arguments that returns the exit status."""
    SUBCOMMANDS.append(add_parser)
    return add_parser


@subcommand
def _add_demo_parser(commands):
    parser = commands.add_parser(
        "demo",
        help="the main job: fine-tune the bundled model on a new operation, answers before/after",
        description="Loads the bundled preset (trained to reverse and sort digit sequences and name an image's "
        "colour), shows its answers, fine-tunes it briefly to `rotate` sequences ('rotate: 3 1 4' -> '1 4 3') "
        "while replaying the known tasks, and shows the answers again with correctness marks and held-out "
        "exact match. A few minutes on 2 CPU cores.",
    )
    _add_preset(parser)
    parser.add_argument("--steps", type=_positive_int, default=500, help="fine-tuning steps " + DEFAULT)
    parser.add_argument("--batch-size", type=_positive_int, default=32, help=DEFAULT)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW rate " + DEFAULT)
    parser.add_argument(
        "--eval-examples", type=_positive_int, default=100, help="held-out prompts per group " + DEFAULT
    )
    parser.add_argument("--output", help="also save the fine-tuned model to this folder")
    parser.add_argument("--seed", type=int, default=0, help=DEFAULT)
    verbosity = "Keras fit verbosity (default: a progress bar on a terminal, else one line)"
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), help=verbosity)
    parser.set_defaults(run=run_demo)


def _marks():
    """Correctness marks that the terminal can print."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "+", "x"


def run_demo(args):
    """Before/after: teach the bundled model `rotate` by fine-tuning, print marked answers."""
    # Seed before anything builds a tokenizer: seeding clears TF's caches.
    keras.utils.set_random_seed(args.seed)
    right, wrong = _marks()
    started = time.time()
    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    _say("T5Gemma 2 demo: teach the bundled tiny model a new operation, `rotate`, by fine-tuning.")
    _say(
        f"Preset {args.preset} ({seq_2_seq_lm.backbone.count_params():,} parameters), loaded in "
        f"{time.time() - started:.1f}s."
    )
    # Held-out prompts never appear in the fine-tuning data or the original training data.
    new = demo.make_examples(["rotate"], args.eval_examples, seed=args.seed + 10, held_out=True)
    known = demo.make_examples(["reverse", "sort", "color"], args.eval_examples, seed=args.seed + 11, held_out=True)
    # Two-digit rotations are reversals: show longer ones, and one example of each known task.
    showcase = [example for example in new if len(example.target) > 3][:3]
    for task in ("reverse", "sort", "color"):
        showcase += [example for example in known if example.prompt.startswith(task)][:1]
    # The demo's prompts and answers are short: pad to what they need, not to the preset's defaults.
    seq_2_seq_lm.preprocessor.encoder_sequence_length = 32
    seq_2_seq_lm.preprocessor.decoder_sequence_length = 16
    # One optimizer for the whole demo; compiling before generating keeps one compiled generate.
    seq_2_seq_lm.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01), sampler="greedy")

    def report(title):
        new_answers = demo.generate_answers(seq_2_seq_lm, new)
        known_answers = demo.generate_answers(seq_2_seq_lm, known)
        answers = dict(zip(map(id, new + known), new_answers + known_answers))
        _say(f"\n{title}")
        for example in showcase:
            answer = answers[id(example)]
            prompt = example.prompt
            if example.image is not None:
                height, width, _ = example.image.shape
                prompt = prompt.replace(IMAGE_MARKER, f"[{height}x{width} image, {example.target}]")
            mark = right if answer == example.target else f"{wrong} (expected {example.target})"
            _say(f"  {prompt:<34} -> {answer:<18} {mark}")
        scores = (demo.exact_match(new_answers, new), demo.exact_match(known_answers, known))
        _say(
            f"  held-out exact match: rotate {scores[0]:.0%} ({len(new)} prompts), "
            f"reverse/sort/color {scores[1]:.0%} ({len(known)} prompts)"
        )
        return scores

    before = report("Before fine-tuning (greedy decoding):")
    # Mostly the new operation, with the known ones replayed so they are not forgotten.
    train = demo.make_examples(
        ["rotate", "rotate", "reverse", "sort", "color"], args.steps * args.batch_size, seed=args.seed + 12
    )
    x, _ = demo.as_inputs(train)
    _say(
        f"\nFine-tuning all weights on {len(train):,} examples (60% rotate, the rest replayed), "
        f"{args.steps} steps of {args.batch_size}:"
    )
    tuning_started = time.time()
    verbose = fit_verbosity("auto" if args.verbose is None else args.verbose)
    seq_2_seq_lm.fit(x, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=verbose)
    _say(f"  done in {time.time() - tuning_started:.0f}s.")
    after = report("After fine-tuning:")
    if args.output:
        seq_2_seq_lm.save_to_preset(args.output)
        _say(
            f"\nSaved the fine-tuned model to {args.output}; try "
            f'`keras-t5gemma generate --preset {args.output} "rotate: 1 2 3"`.'
        )
    _say(
        f"\nHeld-out exact match, before -> after: rotate {before[0]:.0%} -> {after[0]:.0%}, "
        f"reverse/sort/color {before[1]:.0%} -> {after[1]:.0%}. Total {time.time() - started:.0f}s."
    )
    return 0


@subcommand
def _add_generate_parser(commands):
    parser = commands.add_parser(
        "generate",
        help="generate answers to text prompts, optionally with images",
        description="Prints one answer per prompt. Images go with every prompt; a prompt without enough "
        f"`{IMAGE_MARKER}` markers gets them appended.",
    )
    _add_preset(parser)
    parser.add_argument("prompts", nargs="*", help="prompts (quote each one)")
    parser.add_argument("--file", help="a text file of prompts, one per line")
    parser.add_argument("--image", action="append", metavar="PATH", help="a PNG/JPEG image (repeatable)")
    parser.add_argument("--sampler", default="greedy", choices=SAMPLERS, help=DEFAULT)
    length = "decoder length in tokens, <bos> included (default: the preset's)"
    parser.add_argument("--max-length", type=_positive_int, help=length)
    parser.add_argument("--encoder-length", type=_positive_int, help="encoder length in tokens (default: the preset's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="for top_k/top_p/random (default: 1.0)")
    parser.add_argument("--top-k", type=_positive_int, default=5, help="for top_k " + DEFAULT)
    parser.add_argument("--top-p", type=float, default=0.9, help="for top_p " + DEFAULT)
    parser.add_argument("--num-beams", type=_positive_int, default=4, help="for beam " + DEFAULT)
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per batch " + DEFAULT)
    parser.add_argument("--seed", type=int, default=0, help="for the random samplers " + DEFAULT)
    parser.add_argument("--show-prompt", action="store_true", help="print `prompt -> answer`")
    onnx = "generate with the ONNX runtime from a folder written by `export --format onnx` (instead of --preset)"
    parser.add_argument("--onnx", metavar="FOLDER", help=onnx)
    parser.set_defaults(run=run_generate)


def run_generate(args):
    keras.utils.set_random_seed(args.seed)
    prompts = _texts(args, "prompts")
    images = [load_image(path) for path in args.image or []]
    prompts = [with_image_markers(prompt, len(images)) for prompt in prompts]
    generate = _onnx_generate(args, images) if args.onnx else _keras_generate(args, images)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        # A ValueError here (a prompt or image the preprocessor refuses) is the user's: status 2.
        for prompt, answer in zip(batch, generate(batch)):
            _say(f"{prompt} -> {answer.strip()}" if args.show_prompt else answer.strip())
    return 0


def _keras_generate(args, images):
    """The preset's `generate` for a batch of prompts, each with `images`."""
    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    preprocessor = seq_2_seq_lm.preprocessor
    if images and preprocessor.image_converter is None:
        raise CommandError(f"the preset {args.preset} has no vision tower; it cannot take --image")
    if args.encoder_length:
        preprocessor.encoder_sequence_length = args.encoder_length
    seq_2_seq_lm.compile(
        sampler=make_sampler(args.sampler, args.temperature, args.top_k, args.top_p, args.num_beams, args.seed)
    )
    max_length = args.max_length or preprocessor.decoder_sequence_length

    def generate(batch):
        inputs = {"encoder_text": batch, **({"images": [images] * len(batch)} if images else {})}
        return seq_2_seq_lm.generate(inputs, max_length=max_length)

    return generate


def _onnx_generate(args, images):
    """`generate --onnx FOLDER`: the ONNX runtime, which needs no Keras."""
    from t5gemma_onnx import OnnxSeq2SeqLM

    if args.sampler == "beam":
        raise CommandError("the ONNX runtime samples greedy, top_k, top_p or random; beam search is Keras-only")
    model = OnnxSeq2SeqLM(args.onnx)
    if images and not model.settings["vision"]:
        raise CommandError(f"the export {args.onnx} has no vision tower; it cannot take --image")
    options = {"max_length": args.max_length, "sampler": args.sampler, "seed": args.seed, "k": args.top_k}
    options.update(p=args.top_p, temperature=args.temperature)
    return lambda batch: model.generate(batch, [images] * len(batch) if images else None, **options)


@subcommand
def _add_fine_tune_parser(commands):
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
    _add_preset(parser)
    parser.add_argument("data", help="a .jsonl or .csv file")
    task = (
        'generate: input/target pairs (T5Gemma2Seq2SeqLM); classify: JSONL {"input": ..., "label": ...} lines '
        '(T5Gemma2TextClassifier); classify-tokens: JSONL {"input": ..., "labels": [...]} lines, one label per '
        "whitespace-separated word (T5Gemma2TokenClassifier); a label is a class index or name " + DEFAULT
    )
    parser.add_argument("--task", default="generate", choices=TASKS, help=task)
    parser.add_argument("--output", default="t5gemma2_fine_tuned", help="folder to save to " + DEFAULT)
    parser.add_argument("--epochs", type=_positive_int, default=3, help=DEFAULT)
    parser.add_argument("--batch-size", type=_positive_int, default=16, help=DEFAULT)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW rate " + DEFAULT)
    parser.add_argument("--weight-decay", type=float, default=0.01, help=DEFAULT)
    lora = "train LoRA adapters of this rank instead of all weights (merged when saved)"
    parser.add_argument("--lora-rank", type=_positive_int, help=lora)
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
        parser.add_argument(f"--{side}-length", type=_positive_int, help=length)
    keep = "epoch checkpoints of this run to keep " + DEFAULT
    parser.add_argument("--keep-checkpoints", type=_positive_int, default=2, help=keep)
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
        result = fine_tune(**options, log=_say)
    except FineTuneInterrupted as stop:
        advice = "; continue with the same command and --resume" if stop.checkpoint else ""
        print(f"keras-t5gemma: interrupted; {stop}{advice}", file=sys.stderr, flush=True)
        return 130
    if args.task != "generate":
        kind, flag = ("token classifier", " --tokens") if args.task == "classify-tokens" else ("classifier", "")
        _say(f'Saved the {kind} to {args.output}; try `keras-t5gemma classify{flag} --preset {args.output} "..."`.')
    elif result.saved:
        _say(f"Saved the fine-tuned model to {args.output}; use it with `--preset {args.output}`.")
    return 0


@subcommand
def _add_embed_parser(commands):
    parser = commands.add_parser(
        "embed",
        help="embed texts with the encoder (pooled, normalised vectors)",
        description="Prints each text's embedding (and their cosine similarities), or saves them with --output "
        '(.npy: a (texts, hidden) float32 array; .jsonl: one {"text", "embedding"} object per line).',
    )
    _add_preset(parser)
    parser.add_argument("texts", nargs="*", help="texts (quote each one)")
    parser.add_argument("--file", help="a text file, one text per line")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS, help=DEFAULT)
    parser.add_argument("--no-normalize", action="store_true", help="keep the vectors' norms")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help=DEFAULT)
    parser.add_argument("--output", help="a .npy or .jsonl file to save to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.set_defaults(run=run_embed)


def run_embed(args):
    from keras_t5gemma.models.t5gemma2_embedder import T5Gemma2Embedder
    from keras_t5gemma.utils.safe_files import atomic_file

    texts = _texts(args, "texts")
    if args.output and Path(args.output).suffix.lower() not in (".npy", ".jsonl"):
        raise CommandError(f"--output must end in .npy or .jsonl; got {args.output}")
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise CommandError(f"{args.output} exists; pass --overwrite to replace it")
    embedder = T5Gemma2Embedder.from_preset(args.preset, pooling=args.pooling, normalize=not args.no_normalize)
    vectors = np.asarray(embedder.predict(texts, batch_size=args.batch_size, verbose=0), "float32")
    if args.output and args.output.lower().endswith(".npy"):
        with atomic_file(args.output, "wb") as file:
            np.save(file, vectors)
    elif args.output:
        with atomic_file(args.output, "w", encoding="utf-8") as file:
            file.writelines(json.dumps({"text": t, "embedding": v.tolist()}) + "\n" for t, v in zip(texts, vectors))
    else:
        with np.printoptions(precision=4, suppress=True, threshold=12, edgeitems=4, linewidth=200):
            for text, vector in zip(texts, vectors):
                _say(f"{text}\t{vector}")
    if args.output:
        _say(f"Saved {vectors.shape[0]} embeddings of size {vectors.shape[1]} to {args.output}.")
    if 1 < len(texts) <= 10:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        _say("cosine similarity:")
        for row, text in zip(unit @ unit.T, texts):
            _say("  " + " ".join(f"{value:6.3f}" for value in row) + f"  {text}")
    return 0


@subcommand
def _add_classify_parser(commands):
    parser = commands.add_parser(
        "classify",
        help="classify texts with a classifier preset (e.g. one from `fine-tune --task classify`)",
        description="Prints `text<TAB>class<TAB>probability` for each text, or with --tokens `word/class` "
        "for each word.",
    )
    _add_preset(parser)
    parser.add_argument("texts", nargs="*", help="texts (quote each one)")
    parser.add_argument("--file", help="a text file, one text per line")
    parser.add_argument("--tokens", action="store_true", help="a token classifier: one class per word")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help=DEFAULT)
    parser.set_defaults(run=run_classify)


def run_classify(args):
    """Prints each text's most likely class and its probability (or, with `--tokens`, each word's class)."""
    from keras_t5gemma.models.t5gemma2_text_classifier import T5Gemma2TextClassifier
    from keras_t5gemma.models.t5gemma2_token_classifier import T5Gemma2TokenClassifier

    texts = _texts(args, "texts")
    classifier = (T5Gemma2TokenClassifier if args.tokens else T5Gemma2TextClassifier).from_preset(args.preset)
    names = classifier.labels or [str(i) for i in range(classifier.num_classes)]
    if args.tokens:
        for text, scores in zip(texts, classifier.predict_words(texts, batch_size=args.batch_size, verbose=0)):
            _say(" ".join(f"{word}/{names[int(row.argmax())]}" for word, row in zip(text.split(), scores)))
        return 0
    logits = np.asarray(classifier.predict(texts, batch_size=args.batch_size, verbose=0), "float64")
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    for text, row in zip(texts, probabilities):
        _say(f"{text}\t{names[int(row.argmax())]}\t{row.max():.3f}")
    return 0


@subcommand
def _add_convert_parser(commands):
    parser = commands.add_parser(
        "convert",
        help="convert a Hugging Face T5Gemma 2 checkpoint to a Keras preset",
        description="Converts a Hugging Face T5Gemma 2 checkpoint to a Keras preset folder, loadable with "
        "`T5Gemma2Seq2SeqLM.from_preset(OUTPUT)`. --verify loads the same weights in transformers (when "
        "installed), reports the largest logit difference and how many greedy tokens agree, and exits with "
        "status 2 when they disagree (logits beyond 1e-4 of the logit scale in float32, 1e-2 in float16, "
        "5e-2 in bfloat16; in float32 also any greedy token).",
        epilog="Example: keras-t5gemma convert hf://google/t5gemma-2-270m-270m ./t5gemma2_270m_270m "
        "--dtype bfloat16 --verify",
    )
    parser.add_argument("source", help="Hugging Face folder, hf://org/name, org/name or a released preset name")
    parser.add_argument("output", help="folder to write the Keras preset to")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--text-only", action="store_true", help="leave out the vision tower")
    parser.add_argument("--verify", action="store_true", help="compare with transformers after converting")
    overwrite = "replace the preset in a non-empty OUTPUT (other files are kept)"
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.set_defaults(run=run_convert)


def run_convert(args):
    from keras_t5gemma.conversion.convert import convert
    from keras_t5gemma.conversion.convert import verify

    seq_2_seq_lm, loader = convert(args.source, args.output, args.dtype, args.text_only, args.overwrite)
    result = verify(seq_2_seq_lm, loader) if args.verify else None
    return 2 if result is not None and not result[-1] else 0


@subcommand
def _add_export_parser(commands):
    parser = commands.add_parser(
        "export",
        help="export a preset for serving without Keras (ONNX) or for transformers",
        description="--format onnx writes encoder.onnx (encoder output and cross keys/values), decoder.onnx (one "
        "step or a prompt chunk against a static self-attention cache), embedder.onnx, the tokenizer and "
        "t5gemma2_onnx.json to OUTPUT; the `t5gemma_onnx` package generates from it with numpy, onnxruntime "
        "and sentencepiece only. --format transformers writes safetensors weights (LoRA merged), config.json, "
        "generation_config.json, the tokenizer and the image processor config, for "
        "T5Gemma2ForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained.",
    )
    _add_preset(parser)
    parser.add_argument("output", help="folder to write (new, empty, or an earlier ONNX export)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    length = "onnx: decoder cache length in tokens, <bos> included (default: the preset's decoder sequence length)"
    parser.add_argument("--max-decode-length", type=_positive_int, help=length)
    parser.add_argument("--quantize", choices=("int8",), help="onnx: weight-only int8 matmuls and embedding table")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS, help="onnx: embedder pooling " + DEFAULT)
    parser.add_argument("--no-normalize", action="store_true", help="onnx: embedder keeps the vectors' norms")
    dtype = "transformers: weights' dtype (default: the preset's)"
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help=dtype)
    shard = "transformers: largest safetensors file, e.g. 500MB " + DEFAULT
    parser.add_argument("--max-shard-size", default="2GB", help=shard)
    parser.set_defaults(run=run_export)


def run_export(args):
    """`export OUTPUT --format onnx` (graphs, tokenizer and settings for serving without Keras) or
    `--format transformers` (a folder `transformers` loads: weights, config, tokenizer)."""
    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    started = time.time()
    if args.format == "onnx":
        from keras_t5gemma.export import export_onnx

        settings = export_onnx(
            seq_2_seq_lm,
            args.output,
            max_decode_length=args.max_decode_length,
            quantize=args.quantize,
            pooling=args.pooling,
            normalize=not args.no_normalize,
        )
        output, what = (
            args.output,
            (
                f"(ONNX opset {settings['opset']}, {settings['quantization'] or 'float32'}, decoder cache "
                f"{settings['max_decode_length']} tokens, "
            ),
        )
        then = f'try `keras-t5gemma generate --onnx {args.output} "..."`.'
    else:
        output = seq_2_seq_lm.export_to_transformers(args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
        what, then = "for transformers (", "load it with T5Gemma2ForConditionalGeneration.from_pretrained."
    size = sum(path.stat().st_size for path in Path(output).iterdir() if path.is_file())
    _say(f"Exported {args.preset} to {output} {what}{size / 2**20:.1f} MiB) in {time.time() - started:.1f}s; {then}")
    return 0


@subcommand
def _add_presets_parser(commands):
    commands.add_parser("presets", help="list the bundled and released presets").set_defaults(run=run_presets)


def run_presets(args):
    from keras_t5gemma.models.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
    from keras_t5gemma.models.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
    from keras_t5gemma.utils.preset_utils import is_bundled

    presets = {**T5Gemma2Seq2SeqLM.presets, **T5GemmaSeq2SeqLM.presets}
    bundled = {name: preset for name, preset in presets.items() if is_bundled(preset)}
    released = {name: preset for name, preset in presets.items() if not is_bundled(preset)}
    for title, group in (("Bundled (no download):", bundled), ("Released (downloaded from the Hub):", released)):
        _say(title)
        for name, preset in group.items():
            _say(f"  {name:<24} {preset['description'].splitlines()[0]}")
    return 0


# === The parser ===


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
        return args.run(args)
    except CommandError as error:
        print(f"keras-t5gemma: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as error:
        # A damaged or missing file, a bad input, an unreachable hub: the user's to fix.
        print(f"keras-t5gemma: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        print(f"keras-t5gemma: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
