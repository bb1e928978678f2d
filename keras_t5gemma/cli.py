"""The `keras-t5gemma` command (also `python -m keras_t5gemma`).

    keras-t5gemma demo                                  # fine-tune the bundled model, before/after
    keras-t5gemma generate "reverse: 1 2 3" "sort: 3 1 2"
    keras-t5gemma generate "color:" --image photo.png
    keras-t5gemma fine-tune data.jsonl --output my_model --epochs 3 --lora-rank 4
    keras-t5gemma generate --preset my_model "rotate: 1 2 3"
    keras-t5gemma embed "sort: 1 2" "sort: 2 1" --output vectors.npy
    keras-t5gemma fine-tune labels.jsonl --task classify --output my_classifier
    keras-t5gemma classify "1 2 3" "3 1 2" --preset my_classifier
    keras-t5gemma convert hf://google/t5gemma-2-270m-270m ./t5gemma2_270m_270m
    keras-t5gemma export digits_onnx --format onnx --quantize int8
    keras-t5gemma generate --onnx digits_onnx "reverse: 1 2 3"
    keras-t5gemma export my_model_hf --format transformers --preset my_model --dtype bfloat16
    keras-t5gemma presets

`--preset` takes a bundled or released preset name, a folder written by
`save_to_preset` (or by `fine-tune`), an `hf://org/name` handle, or a local
Hugging Face checkpoint folder. User errors (a missing or damaged file, a bad
data line or prompt, an unknown preset, an output folder that is not empty, no
network for an `hf://` handle) print one `error:` line and exit with status 2;
other failures while loading or running a model exit with status 1. Nothing
the command did not write is overwritten without `--overwrite`.
"""

import argparse
import contextlib
import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import keras
import numpy as np

from keras_t5gemma import demo
from keras_t5gemma.models.t5gemma2_tokenizer import START_OF_IMAGE_PIECE as IMAGE_MARKER

DEFAULT_PRESET = "t5gemma2_tiny_digits"
SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam")
EXPORT_FORMATS = ("onnx", "transformers")


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


def _marks():
    """Correctness marks that the terminal can print."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "+", "x"


def _progress_verbosity():
    """Keras' progress bar on a terminal; one line per epoch in logs, where the bar would print every update."""
    return 1 if sys.stdout.isatty() else 2


def _check_preset(preset):
    """Fails early, as a user error, on a preset that is neither a name, a folder nor a handle."""
    from keras_t5gemma.utils.preset_utils import resolve_preset

    try:
        resolve_preset(preset)
    except ValueError as error:
        raise CommandError(str(error)) from None


def load_seq_2_seq_lm(preset, dtype=None):
    """The task of the preset's generation: `T5GemmaSeq2SeqLM` for T5Gemma (first generation), else T5Gemma 2's.

    `dtype` (a dtype policy name such as `"mixed_bfloat16"`) replaces the preset's.
    """
    from keras_t5gemma.models.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
    from keras_t5gemma.models.t5gemma_backbone import T5GemmaBackbone
    from keras_t5gemma.models.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
    from keras_t5gemma.utils.preset_utils import get_preset_loader

    _check_preset(preset)
    backbone_cls = get_preset_loader(preset).check_backbone_class()
    task_cls = T5GemmaSeq2SeqLM if issubclass(backbone_cls, T5GemmaBackbone) else T5Gemma2Seq2SeqLM
    return task_cls.from_preset(preset, **({"dtype": dtype} if dtype else {}))


def _read_lines(path):
    """Non-blank lines of a text file."""
    if not os.path.isfile(path):
        raise CommandError(f"no such file: {path}")
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\n") for line in file if line.strip()]


def _load_image(path, size=None):
    """An RGB uint8 `(H, W, 3)` array, converted as the Python API converts PIL images; resized
    (Pillow bilinear) to `size` if given."""
    from PIL import Image
    from PIL import UnidentifiedImageError

    from keras_t5gemma.models.t5gemma2_image_converter import pil_image_to_rgb

    if not os.path.isfile(path):
        raise CommandError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            pixels = pil_image_to_rgb(image)
    except Image.DecompressionBombError as error:
        raise CommandError(f"the image {path} is too large to read safely ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"cannot read the image {path}: {error}") from None
    if size is not None and pixels.shape[:2] != tuple(size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return pixels


def with_image_markers(prompt, images):
    """`prompt` with a `<start_of_image>` appended for each image it has no marker for."""
    missing = images - prompt.count(IMAGE_MARKER)
    if missing < 0:
        raise CommandError(f"the prompt {prompt!r} has more {IMAGE_MARKER} markers than the {images} image(s) given")
    return " ".join([prompt, *[IMAGE_MARKER] * missing]) if missing else prompt


def read_pairs(path):
    """`[(input, target, image path or None)]` from a JSONL or CSV file.

    JSONL: one object per line with string fields `input` and `target`
    (optionally `image`, a path relative to the data file); blank lines are
    skipped. CSV: a header naming the columns `input` and `target` (and
    optionally `image`).

    Raises:
        CommandError: naming the file and line of the first bad record.
    """
    if not os.path.isfile(path):
        raise CommandError(f"no such file: {path}")
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise CommandError(f"{path}: expected a .jsonl or .csv file")
    folder = os.path.dirname(os.path.abspath(path))
    pairs = []
    try:
        with open(path, encoding="utf-8", newline="") as file:
            lines = file.read().splitlines(keepends=True)
    except UnicodeDecodeError as error:
        raise CommandError(f"{path}: not UTF-8 text ({error.reason})") from None
    if suffix == ".jsonl":
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CommandError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            pairs.append(_pair(record, f"{path}, line {number}", folder))
    else:
        reader = csv.DictReader(lines)
        header = reader.fieldnames or []
        if "input" not in header or "target" not in header:
            raise CommandError(
                f"{path}: the CSV header must name the columns `input` and `target` "
                f"(and optionally `image`); found {header}"
            )
        for record in reader:
            pairs.append(_pair(record, f"{path}, line {reader.line_num}", folder))
    if not pairs:
        raise CommandError(f"{path}: no examples")
    return pairs


def _pair(record, where, folder):
    if not isinstance(record, dict):
        raise CommandError(f"{where}: expected an object with `input` and `target`")
    for key in ("input", "target"):
        if not isinstance(record.get(key), str):
            raise CommandError(f"{where}: `{key}` must be a string; got {record.get(key)!r}")
    image = record.get("image") or None
    if image is not None:
        if not isinstance(image, str):
            raise CommandError(f"{where}: `image` must be a file path; got {image!r}")
        image = os.path.join(folder, image)
        if not os.path.isfile(image):
            raise CommandError(f"{where}: no such image file: {image}")
        inside = os.path.realpath(folder)
        if os.path.commonpath([inside, os.path.realpath(image)]) != inside:
            print(
                f"keras-t5gemma: warning: {where}: the image {image} is outside the data file's folder", file=sys.stderr
            )
    elif IMAGE_MARKER in record["input"]:
        raise CommandError(f"{where}: `input` has a {IMAGE_MARKER} marker but the record has no `image`")
    return record["input"], record["target"], image


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


def _set_sequence_lengths(preprocessor, encoder_length=None, decoder_length=None):
    if encoder_length:
        preprocessor.encoder_sequence_length = encoder_length
    if decoder_length:
        preprocessor.decoder_sequence_length = decoder_length


def _image_size(seq_2_seq_lm):
    converter = seq_2_seq_lm.preprocessor.image_converter
    return None if converter is None else tuple(converter.image_size)


# === Subcommands ===


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
    _set_sequence_lengths(seq_2_seq_lm.preprocessor, 32, 16)
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
    verbose = _progress_verbosity() if args.verbose is None else args.verbose
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


def run_generate(args):
    keras.utils.set_random_seed(args.seed)
    prompts = list(args.prompts) + (_read_lines(args.file) if args.file else [])
    if not prompts:
        raise CommandError("give prompts as arguments or with --file")
    images = [_load_image(path) for path in args.image or []]
    prompts = [with_image_markers(prompt, len(images)) for prompt in prompts]
    if args.onnx:
        return _generate_onnx(args, prompts, images)
    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    preprocessor = seq_2_seq_lm.preprocessor
    if images and preprocessor.image_converter is None:
        raise CommandError(f"the preset {args.preset} has no vision tower; it cannot take --image")
    _set_sequence_lengths(preprocessor, args.encoder_length)
    seq_2_seq_lm.compile(
        sampler=make_sampler(args.sampler, args.temperature, args.top_k, args.top_p, args.num_beams, args.seed)
    )
    max_length = args.max_length or preprocessor.decoder_sequence_length
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        inputs = {"encoder_text": batch}
        if images:
            inputs["images"] = [images] * len(batch)
        try:
            answers = seq_2_seq_lm.generate(inputs, max_length=max_length)
        except ValueError as error:  # the prompts or images, as the preprocessor checks them
            raise CommandError(_one_line(error)) from None
        for prompt, answer in zip(batch, answers):
            _say(f"{prompt} -> {answer.strip()}" if args.show_prompt else answer.strip())
    return 0


def _generate_onnx(args, prompts, images):
    """`generate --onnx FOLDER`: the ONNX runtime, which needs no Keras."""
    from t5gemma_onnx import OnnxSeq2SeqLM

    if args.sampler == "beam":
        raise CommandError("the ONNX runtime samples greedy, top_k, top_p or random; beam search is Keras-only")
    try:
        model = OnnxSeq2SeqLM(args.onnx)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if images and not model.settings["vision"]:
        raise CommandError(f"the export {args.onnx} has no vision tower; it cannot take --image")
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        try:
            answers = model.generate(
                batch,
                [images] * len(batch) if images else None,
                max_length=args.max_length,
                sampler=args.sampler,
                seed=args.seed,
                k=args.top_k,
                p=args.top_p,
                temperature=args.temperature,
            )
        except ValueError as error:  # a prompt that does not fit, images that do not match
            raise CommandError(str(error)) from None
        for prompt, answer in zip(batch, answers):
            _say(f"{prompt} -> {answer.strip()}" if args.show_prompt else answer.strip())
    return 0


def run_export_onnx(args):
    """`export OUTPUT --format onnx`: graphs, tokenizer and settings for serving without Keras."""
    from keras_t5gemma.export import export_onnx

    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    started = time.time()
    try:
        settings = export_onnx(
            seq_2_seq_lm,
            args.output,
            max_decode_length=args.max_decode_length,
            quantize=args.quantize,
            pooling=args.pooling,
            normalize=not args.no_normalize,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    size = sum(path.stat().st_size for path in Path(args.output).iterdir() if path.is_file())
    _say(
        f"Exported {args.preset} to {args.output} (ONNX opset {settings['opset']}, "
        f"{settings['quantization'] or 'float32'}, decoder cache {settings['max_decode_length']} tokens, "
        f"{size / 2**20:.1f} MiB) in {time.time() - started:.1f}s; try "
        f'`keras-t5gemma generate --onnx {args.output} "..."`.'
    )
    return 0


def _fine_tune_settings(args, pairs_digest):
    """What a resumed run must share with the run it continues."""
    return {
        "preset": args.preset,
        "data_sha256": pairs_digest,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lora_rank": args.lora_rank,
        "encoder_length": args.encoder_length,
        "decoder_length": args.decoder_length,
        "seed": args.seed,
    }


def _sha256(path):
    import hashlib

    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def _run_to_continue(args, settings):
    """With --resume, the last run under --output (after checking its settings), else None."""
    from keras_t5gemma.training.checkpoints import latest_run
    from keras_t5gemma.training.checkpoints import read_run_settings

    run = latest_run(args.output) if args.resume else None
    if run is None:
        return None
    saved = read_run_settings(run)
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in settings.items() if saved.get(key) != value]
    if changed:
        raise CommandError(
            f"--resume: {run} was started with other settings ({'; '.join(changed)}); "
            "give the same ones, or start a new run without --resume"
        )
    return run


def read_labelled(path, per_word=False):
    """`(texts, labels, names)` from a JSONL file of labelled inputs.

    Lines are `{"input": str, "label": class}`, or with `per_word`
    `{"input": str, "labels": [class per whitespace-separated word]}`; a class
    is an index or a name. Names are numbered in order of first appearance
    and returned (else `names` is `None`); per-word labels are lists.
    """
    if not os.path.isfile(path):
        raise CommandError(f"no such file: {path}")
    if Path(path).suffix.lower() != ".jsonl":
        raise CommandError(f"{path}: classification data must be a .jsonl file")
    key = "labels" if per_word else "label"
    texts, labels = [], []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CommandError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("input"), str):
                raise CommandError(f"{where}: expected an object with a string `input`")
            label = record.get(key)
            if per_word:
                words = len(record["input"].split())
                if not isinstance(label, list) or len(label) != words:
                    raise CommandError(f"{where}: `labels` must be a list of {words} classes, one per word")
            for value in label if per_word else [label]:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, str))
                    or (isinstance(value, int) and value < 0)
                ):
                    raise CommandError(f"{where}: `{key}` must hold class indices or names; got {value!r}")
            texts.append(record["input"])
            labels.append(label)
    if not texts:
        raise CommandError(f"{path}: no examples")
    flat = [value for label in labels for value in (label if per_word else [label])]
    if all(isinstance(value, int) for value in flat):
        return texts, labels, None
    if any(isinstance(value, int) for value in flat):
        raise CommandError(f"{path}: labels mix class indices and names; use one or the other")
    names = list(dict.fromkeys(flat))
    index = {name: i for i, name in enumerate(names)}
    if per_word:
        return texts, [[index[value] for value in label] for label in labels], names
    return texts, [index[label] for label in labels], names


def _classifier_class(per_word):
    from keras_t5gemma.models.t5gemma2_text_classifier import T5Gemma2TextClassifier
    from keras_t5gemma.models.t5gemma2_token_classifier import T5Gemma2TokenClassifier

    return T5Gemma2TokenClassifier if per_word else T5Gemma2TextClassifier


def _training_dtype(args):
    """`from_preset`'s dtype argument for `fine-tune --mixed-bfloat16`, else nothing."""
    return {"dtype": "mixed_bfloat16"} if args.mixed_bfloat16 else {}


def run_fine_tune_classifier(args):
    """`fine-tune --task classify` / `classify-tokens`: a text or token classifier on labelled JSONL lines."""
    per_word = args.task == "classify-tokens"
    texts, labels, names = read_labelled(args.data, per_word)
    _check_preset(args.preset)
    keras.utils.set_random_seed(args.seed)
    order = np.random.default_rng(args.seed).permutation(len(texts))
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    flat = [value for label in labels for value in (label if per_word else [label])]
    num_classes = len(names) if names else max(flat) + 1
    classifier = _classifier_class(per_word).from_preset(
        args.preset, num_classes=num_classes, labels=names, **_training_dtype(args)
    )
    if args.encoder_length:
        classifier.preprocessor.sequence_length = args.encoder_length
    if args.lora_rank:
        classifier.backbone.enable_lora(args.lora_rank)
    kind = "token classifier" if per_word else "classifier"
    _say(
        f"Fine-tuning a {num_classes}-class {kind} from {args.preset} on {len(texts):,} examples from "
        f"{args.data}: {args.epochs} epoch(s) of batch {args.batch_size}, learning rate {args.learning_rate}."
    )
    classifier.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay))
    history = classifier.fit(
        texts,
        labels if per_word else np.array(labels),
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=False,
        verbose=0 if args.quiet else _progress_verbosity(),
    )
    classifier.save_to_preset(args.output)
    accuracy = next(values[-1] for name, values in history.history.items() if "accuracy" in name)
    flag = " --tokens" if per_word else ""
    _say(
        f"Training accuracy after the last epoch: {accuracy:.1%}.\n"
        f'Saved the {kind} to {args.output}; try `keras-t5gemma classify{flag} --preset {args.output} "..."`.'
    )
    return 0


def _softmax(logits):
    logits = np.asarray(logits, "float64")
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    return probabilities / probabilities.sum(-1, keepdims=True)


def run_classify(args):
    """Prints each text's most likely class and its probability (or, with `--tokens`, each word's class)."""
    texts = list(args.texts) + (_read_lines(args.file) if args.file else [])
    if not texts:
        raise CommandError("give texts as arguments or with --file")
    _check_preset(args.preset)
    classifier = _classifier_class(args.tokens).from_preset(args.preset)
    names = classifier.labels or [str(i) for i in range(classifier.num_classes)]
    if args.tokens:
        for text, scores in zip(texts, classifier.predict_words(texts, batch_size=args.batch_size, verbose=0)):
            tags = [f"{word}/{names[int(row.argmax())]}" for word, row in zip(text.split(), scores)]
            _say(" ".join(tags))
        return 0
    probabilities = _softmax(classifier.predict(texts, batch_size=args.batch_size, verbose=0))
    for text, row in zip(texts, probabilities):
        _say(f"{text}\t{names[int(row.argmax())]}\t{row.max():.3f}")
    return 0


def run_fine_tune(args):
    from keras_t5gemma.training import checkpoints as training_checkpoints
    from keras_t5gemma.training import distribution as training_distribution

    if not 0.0 < args.learning_rate < 1.0:
        raise CommandError("--learning-rate must be in (0, 1)")
    if args.task != "generate":
        if args.resume or args.mesh or args.multi_host:
            raise CommandError(
                f"--task {args.task} trains on one process and saves at the end: drop --resume, --mesh and --multi-host"
            )
        return run_fine_tune_classifier(args)
    if args.resume and args.overwrite:
        raise CommandError("--resume continues the last run in --output, --overwrite starts a new one: give one")
    if args.multi_host:
        # Reads KERAS_DISTRIBUTION_* (or, on a Cloud TPU pod, finds the other hosts itself).
        keras.distribution.initialize()
    try:
        mesh_shape = training_distribution.parse_mesh(args.mesh) if args.mesh else None
        distribution = training_distribution.make_distribution(mesh_shape)
    except ValueError as error:
        raise CommandError(str(error)) from None
    # Every process checks before any creates its run folder; process 0's answer counts.
    refusal = ""
    try:
        training_checkpoints.check_output_folder(args.output, overwrite=args.overwrite, resume=args.resume)
    except ValueError as error:
        refusal = str(error)
    if training_checkpoints.agree(bool(refusal)):
        raise CommandError(refusal or f"process 0 refused --output {args.output}")
    data_axis = training_distribution.batch_axis_size(distribution)
    if args.batch_size % data_axis:
        raise CommandError(f"--batch-size {args.batch_size} must be a multiple of the mesh's batch axis ({data_axis})")
    processes = training_checkpoints.process_count()
    parts, _ = training_distribution.data_shards(distribution)
    pairs = read_pairs(args.data)
    _check_preset(args.preset)
    settings = _fine_tune_settings(args, _sha256(args.data))
    run = _run_to_continue(args, settings)
    # Seed before anything builds a tokenizer: seeding clears TF's caches.
    keras.utils.set_random_seed(args.seed)
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    if distribution is not None:
        # Each process feeds its rows of every complete global batch.
        rows = training_distribution.process_rows(len(pairs), args.batch_size, distribution)
        if not rows:
            raise CommandError(f"{args.data} has {len(pairs)} examples, fewer than one batch of {args.batch_size}")
        pairs = [pairs[row] for row in rows]
    with distribution.scope() if distribution is not None else contextlib.nullcontext():
        seq_2_seq_lm = load_seq_2_seq_lm(args.preset, **_training_dtype(args))
        preprocessor = seq_2_seq_lm.preprocessor
        _set_sequence_lengths(preprocessor, args.encoder_length, args.decoder_length)
        image_size = _image_size(seq_2_seq_lm)
        placeholder = preprocessor.tokenizer.image_placeholder_token
        for text, _, _ in pairs:
            if placeholder and placeholder in text:
                raise CommandError(f"{args.data}: the input {text!r} holds {placeholder}, which is reserved for images")
        has_images = any(image for _, _, image in pairs)
        if has_images and image_size is None:
            raise CommandError(f"{args.data} has images but the preset {args.preset} has no vision tower")
        x = {
            "encoder_text": [with_image_markers(text, 1) if image else text for text, _, image in pairs],
            "decoder_text": [target for _, target, _ in pairs],
        }
        if has_images:
            # A dense array of one image slot per sample; samples without an image leave it unused.
            images = np.zeros((len(pairs), 1, *image_size, 3), "uint8")
            for row, (_, _, image) in enumerate(pairs):
                if image:
                    images[row, 0] = _load_image(image, image_size)
            x["images"] = images
        # Before `enable_lora`, so that a trained vision tower gets adapters too.
        seq_2_seq_lm.train_vision_tower = args.train_vision_tower
        if args.lora_rank:
            seq_2_seq_lm.backbone.enable_lora(args.lora_rank)
        seq_2_seq_lm.compile(
            optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay), sampler="greedy"
        )
        seq_2_seq_lm.optimizer.build(seq_2_seq_lm.trainable_variables)
        if run is None:
            run = training_checkpoints.start_run(args.output, settings)
        checkpoints = training_checkpoints.TrainingCheckpoints(
            os.path.join(run, "checkpoints"), keep=args.keep_checkpoints
        )
        done = checkpoints.restore(seq_2_seq_lm) if checkpoints.latest_step() else 0
        trainable = sum(int(np.prod(weight.shape)) for weight in seq_2_seq_lm.trainable_weights)
        where = f" on {distribution.device_mesh.shape} devices (batch, model)" if distribution is not None else ""
        _say(
            f"Fine-tuning {args.preset} on {len(pairs) * parts:,} examples from {args.data}{where}: "
            f"{args.epochs} epoch(s) of batch {args.batch_size}, learning rate {args.learning_rate}, "
            f"{trainable:,} trainable parameters"
            + (f" (LoRA rank {args.lora_rank})" if args.lora_rank else "")
            + (f"; resuming {run} after epoch {done}" if done else f"; checkpoints in {run}")
            + "."
        )
        try:
            history = seq_2_seq_lm.fit(
                x,
                batch_size=args.batch_size // parts,
                epochs=args.epochs,
                initial_epoch=done,
                shuffle=False,
                callbacks=[checkpoints.callback()],
                verbose=0 if args.quiet else _progress_verbosity(),
            )
        except KeyboardInterrupt:
            last = checkpoints.latest_step()
            print(
                "keras-t5gemma: interrupted; "
                + (
                    f"the last complete checkpoint is {checkpoints.path(last)} (epoch {last} of {args.epochs}); "
                    "continue with the same command and --resume"
                    if last
                    else f"no checkpoint was completed in {run}"
                ),
                file=sys.stderr,
                flush=True,
            )
            return 130
        losses = ", ".join(f"{loss:.4f}" for loss in history.history.get("loss", []))
        _say(
            (f"Loss per epoch: {losses}." if losses else f"The run had finished its {done} epoch(s) already.")
            + f"\nCheckpoints of this run: {checkpoints.directory}."
        )
        if processes > 1:
            _say(
                "Several processes hold the weights' shards; the checkpoint holds the whole model. Run the same "
                f"command with --resume on one host to write the final model to {args.output}."
            )
            return 0
        # OUTPUT holds the runs: the preset's files are replaced, the runs kept.
        seq_2_seq_lm.save_to_preset(args.output, overwrite=True)
    _say(f"Saved the fine-tuned model to {args.output}; use it with `--preset {args.output}`.")
    return 0


def run_embed(args):
    texts = list(args.texts) + (_read_lines(args.file) if args.file else [])
    if not texts:
        raise CommandError("give texts as arguments or with --file")
    if args.output and Path(args.output).suffix.lower() not in (".npy", ".jsonl"):
        raise CommandError(f"--output must end in .npy or .jsonl; got {args.output}")
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise CommandError(f"{args.output} exists; pass --overwrite to replace it")
    _check_preset(args.preset)
    try:
        from keras_t5gemma.models.t5gemma2_embedder import T5Gemma2Embedder
    except ImportError as error:
        raise CommandError(f"embeddings need T5Gemma2Embedder, which this installation lacks ({error})") from None
    embedder = T5Gemma2Embedder.from_preset(args.preset, pooling=args.pooling, normalize=not args.no_normalize)
    vectors = np.asarray(embedder.predict(texts, batch_size=args.batch_size, verbose=0), "float32")
    if args.output:
        from keras_t5gemma.utils.safe_files import atomic_file

        if args.output.lower().endswith(".npy"):
            with atomic_file(args.output, "wb") as file:
                np.save(file, vectors)
        else:
            with atomic_file(args.output, "w", encoding="utf-8") as file:
                for text, vector in zip(texts, vectors):
                    file.write(json.dumps({"text": text, "embedding": vector.tolist()}) + "\n")
        _say(f"Saved {vectors.shape[0]} embeddings of size {vectors.shape[1]} to {args.output}.")
    else:
        with np.printoptions(precision=4, suppress=True, threshold=12, edgeitems=4, linewidth=200):
            for text, vector in zip(texts, vectors):
                _say(f"{text}\t{vector}")
    if 1 < len(texts) <= 10:
        norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
        cosine = (vectors / np.maximum(norms, 1e-12)) @ (vectors / np.maximum(norms, 1e-12)).T
        _say("cosine similarity:")
        for i, text in enumerate(texts):
            _say("  " + " ".join(f"{value:6.3f}" for value in cosine[i]) + f"  {text}")
    return 0


def build_convert_parser():
    return argparse.ArgumentParser(
        prog="keras-t5gemma convert",
        description="Converts a Hugging Face T5Gemma 2 checkpoint to a Keras preset folder, loadable with "
        "`T5Gemma2Seq2SeqLM.from_preset(OUTPUT)`. --verify loads the same weights in transformers (when "
        "installed), reports the largest logit difference and how many greedy tokens agree, and exits with "
        "status 2 when they disagree (logits beyond 1e-4 of the logit scale in float32, 1e-2 in float16, "
        "5e-2 in bfloat16; in float32 also any greedy token).",
        epilog="Example: keras-t5gemma convert hf://google/t5gemma-2-270m-270m ./t5gemma2_270m_270m "
        "--dtype bfloat16 --verify",
    )


def run_convert(argv):
    """`keras-t5gemma convert SOURCE OUTPUT [--dtype] [--text-only] [--verify]`."""
    parser = build_convert_parser()
    parser.add_argument("source", help="Hugging Face folder, hf://org/name, org/name or a released preset name")
    parser.add_argument("output", help="folder to write the Keras preset to")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--text-only", action="store_true", help="leave out the vision tower")
    parser.add_argument("--verify", action="store_true", help="compare with transformers after converting")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the preset in a non-empty OUTPUT (other files are kept)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse: --help, or bad arguments
        return exit.code
    from keras_t5gemma.conversion.convert import convert
    from keras_t5gemma.conversion.convert import verify

    try:
        seq_2_seq_lm, loader = convert(args.source, args.output, args.dtype, args.text_only, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as error:
        print(f"keras-t5gemma: error: {error}", file=sys.stderr)
        return 2
    if args.verify:
        result = verify(seq_2_seq_lm, loader)
        if result is not None and not result[-1]:
            return 2
    return 0


def run_export_transformers(args):
    """`export OUTPUT --format transformers`: a folder `transformers` loads (weights, config, tokenizer)."""
    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    started = time.time()
    try:
        output = seq_2_seq_lm.export_to_transformers(args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except ValueError as error:  # a folder in the way, a quantized or text-only model, a bad size
        raise CommandError(str(error)) from None
    size = sum(path.stat().st_size for path in output.iterdir())
    _say(
        f"Exported {args.preset} to {output} for transformers ({size / 2**20:.1f} MiB) in "
        f"{time.time() - started:.1f}s; load it with T5Gemma2ForConditionalGeneration.from_pretrained."
    )
    return 0


def run_export(args):
    return {"onnx": run_export_onnx, "transformers": run_export_transformers}[args.format](args)


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


# === Parser ===


def _add_preset(parser):
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="preset name, folder written by save_to_preset / fine-tune, hf://org/name handle, or Hugging Face "
        "checkpoint folder (default: %(default)s, bundled)",
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-t5gemma",
        description="T5Gemma 2 (Gemma 3 encoder-decoder, text and images) in Keras 3: a demo, generation, "
        "fine-tuning, embeddings and checkpoint conversion. Runs on the bundled tiny preset by default.",
        epilog="Run `keras-t5gemma COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo_command = commands.add_parser(
        "demo",
        help="the main job: fine-tune the bundled model on a new operation, answers before/after",
        description="Loads the bundled preset (trained to reverse and sort digit sequences and name an image's "
        "colour), shows its answers, fine-tunes it briefly to `rotate` sequences ('rotate: 3 1 4' -> '1 4 3') "
        "while replaying the known tasks, and shows the answers again with correctness marks and held-out "
        "exact match. A few minutes on 2 CPU cores.",
    )
    _add_preset(demo_command)
    demo_command.add_argument(
        "--steps", type=_positive_int, default=500, help="fine-tuning steps (default: %(default)s)"
    )
    demo_command.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    demo_command.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW rate (default: %(default)s)")
    demo_command.add_argument(
        "--eval-examples", type=_positive_int, default=100, help="held-out prompts per group (default: %(default)s)"
    )
    demo_command.add_argument("--output", help="also save the fine-tuned model to this folder")
    demo_command.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    demo_command.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        help="Keras fit verbosity (default: a progress bar on a terminal, else one line)",
    )
    demo_command.set_defaults(run=run_demo)

    generate = commands.add_parser(
        "generate",
        help="generate answers to text prompts, optionally with images",
        description="Prints one answer per prompt. Images go with every prompt; a prompt without enough "
        f"`{IMAGE_MARKER}` markers gets them appended.",
    )
    _add_preset(generate)
    generate.add_argument("prompts", nargs="*", help="prompts (quote each one)")
    generate.add_argument("--file", help="a text file of prompts, one per line")
    generate.add_argument("--image", action="append", metavar="PATH", help="a PNG/JPEG image (repeatable)")
    generate.add_argument("--sampler", default="greedy", choices=SAMPLERS, help="(default: %(default)s)")
    generate.add_argument(
        "--max-length", type=_positive_int, help="decoder length in tokens, <bos> included (default: the preset's)"
    )
    generate.add_argument(
        "--encoder-length", type=_positive_int, help="encoder length in tokens (default: the preset's)"
    )
    generate.add_argument("--temperature", type=float, default=1.0, help="for top_k/top_p/random (default: 1.0)")
    generate.add_argument("--top-k", type=_positive_int, default=5, help="for top_k (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=0.9, help="for top_p (default: %(default)s)")
    generate.add_argument("--num-beams", type=_positive_int, default=4, help="for beam (default: %(default)s)")
    generate.add_argument(
        "--batch-size", type=_positive_int, default=32, help="prompts per batch (default: %(default)s)"
    )
    generate.add_argument("--seed", type=int, default=0, help="for the random samplers (default: %(default)s)")
    generate.add_argument("--show-prompt", action="store_true", help="print `prompt -> answer`")
    generate.add_argument(
        "--onnx",
        metavar="FOLDER",
        help="generate with the ONNX runtime from a folder written by `export --format onnx` (instead of --preset)",
    )
    generate.set_defaults(run=run_generate)

    fine_tune = commands.add_parser(
        "fine-tune",
        help="fine-tune on a JSONL or CSV file of input/target pairs",
        description='Data: JSONL with one {"input": ..., "target": ...} object per line, or CSV with the '
        "columns input,target; an optional `image` field/column is an image path relative to the data file. "
        "Each run keeps a checkpoint of its training state after each epoch (sharded Orbax checkpoints, "
        "written by every process) in its own folder OUTPUT/runs/run_NNN/checkpoints/, and the final model "
        "in OUTPUT. With several devices it trains data-parallel, or on a --mesh; on a pod, run the same "
        "command on every host with --multi-host.",
    )
    _add_preset(fine_tune)
    fine_tune.add_argument("data", help="a .jsonl or .csv file")
    fine_tune.add_argument(
        "--task",
        default="generate",
        choices=("generate", "classify", "classify-tokens"),
        help='generate: input/target pairs (T5Gemma2Seq2SeqLM); classify: JSONL {"input": ..., "label": ...} '
        'lines (T5Gemma2TextClassifier); classify-tokens: JSONL {"input": ..., "labels": [...]} lines, one '
        "label per whitespace-separated word (T5Gemma2TokenClassifier); a label is a class index or name "
        "(default: %(default)s)",
    )
    fine_tune.add_argument("--output", default="t5gemma2_fine_tuned", help="folder to save to (default: %(default)s)")
    fine_tune.add_argument("--epochs", type=_positive_int, default=3, help="(default: %(default)s)")
    fine_tune.add_argument("--batch-size", type=_positive_int, default=16, help="(default: %(default)s)")
    fine_tune.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW rate (default: %(default)s)")
    fine_tune.add_argument("--weight-decay", type=float, default=0.01, help="(default: %(default)s)")
    fine_tune.add_argument(
        "--lora-rank",
        type=_positive_int,
        help="train LoRA adapters of this rank instead of all weights (merged when saved)",
    )
    fine_tune.add_argument(
        "--train-vision-tower",
        action="store_true",
        help="train the vision tower too (default: frozen, as T5Gemma 2 is fine-tuned)",
    )
    fine_tune.add_argument(
        "--mixed-bfloat16",
        action="store_true",
        help="compute in bfloat16 with float32 weights (Keras' mixed_bfloat16 policy; faster on TPUs and "
        "recent GPUs); the saved model keeps the policy",
    )
    fine_tune.add_argument(
        "--encoder-length",
        type=_positive_int,
        help="encoder tokens; longer inputs are truncated (default: the preset's)",
    )
    fine_tune.add_argument(
        "--decoder-length",
        type=_positive_int,
        help="decoder tokens; longer targets are truncated (default: the preset's)",
    )
    fine_tune.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=2,
        help="epoch checkpoints of this run to keep (default: %(default)s)",
    )
    fine_tune.add_argument(
        "--resume",
        action="store_true",
        help="continue the last run in OUTPUT from its last complete checkpoint (the same settings; "
        "--epochs may grow); starts a run if OUTPUT is empty",
    )
    fine_tune.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUTPUT: a new run beside the earlier ones, and the final model's files",
    )
    fine_tune.add_argument(
        "--mesh",
        metavar="BATCHxMODEL",
        help="shard the model over a (batch, model) mesh of all devices, e.g. 2x4 (default: data parallel "
        "over all devices, JAX only)",
    )
    fine_tune.add_argument(
        "--multi-host",
        action="store_true",
        help="join the other hosts of a pod first (keras.distribution.initialize: KERAS_DISTRIBUTION_* "
        "variables, or found by itself on a Cloud TPU pod)",
    )
    fine_tune.add_argument("--seed", type=int, default=0, help="shuffling and initialisation (default: 0)")
    fine_tune.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (default: a progress bar on a terminal, else a line per epoch)",
    )
    fine_tune.set_defaults(run=run_fine_tune)

    embed = commands.add_parser(
        "embed",
        help="embed texts with the encoder (pooled, normalised vectors)",
        description="Prints each text's embedding (and their cosine similarities), or saves them with --output "
        '(.npy: a (texts, hidden) float32 array; .jsonl: one {"text", "embedding"} object per line).',
    )
    _add_preset(embed)
    embed.add_argument("texts", nargs="*", help="texts (quote each one)")
    embed.add_argument("--file", help="a text file, one text per line")
    embed.add_argument("--pooling", default="mean", choices=("mean", "first", "last"), help="(default: %(default)s)")
    embed.add_argument("--no-normalize", action="store_true", help="keep the vectors' norms")
    embed.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    embed.add_argument("--output", help="a .npy or .jsonl file to save to")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    embed.set_defaults(run=run_embed)

    classify = commands.add_parser(
        "classify",
        help="classify texts with a classifier preset (e.g. one from `fine-tune --task classify`)",
        description="Prints `text<TAB>class<TAB>probability` for each text, or with --tokens `word/class` "
        "for each word.",
    )
    _add_preset(classify)
    classify.add_argument("texts", nargs="*", help="texts (quote each one)")
    classify.add_argument("--file", help="a text file, one text per line")
    classify.add_argument("--tokens", action="store_true", help="a token classifier: one class per word")
    classify.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    classify.set_defaults(run=run_classify)

    commands.add_parser(
        "convert",
        add_help=False,
        help="convert a Hugging Face T5Gemma 2 checkpoint to a Keras preset (`convert --help` for options)",
    )

    export = commands.add_parser(
        "export",
        help="export a preset for serving without Keras (ONNX) or for transformers",
        description="--format onnx writes encoder.onnx (encoder output and cross keys/values), decoder.onnx (one "
        "step or a prompt chunk against a static self-attention cache), embedder.onnx, the tokenizer and "
        "t5gemma2_onnx.json to OUTPUT; the `t5gemma_onnx` package generates from it with numpy, onnxruntime "
        "and sentencepiece only. --format transformers writes safetensors weights (LoRA merged), config.json, "
        "generation_config.json, the tokenizer and the image processor config, for "
        "T5Gemma2ForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained.",
    )
    _add_preset(export)
    export.add_argument("output", help="folder to write (new, empty, or an earlier ONNX export)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    export.add_argument(
        "--max-decode-length",
        type=_positive_int,
        help="onnx: decoder cache length in tokens, <bos> included (default: the preset's decoder sequence length)",
    )
    export.add_argument("--quantize", choices=("int8",), help="onnx: weight-only int8 matmuls and embedding table")
    export.add_argument(
        "--pooling",
        default="mean",
        choices=("mean", "first", "last"),
        help="onnx: embedder pooling (default: %(default)s)",
    )
    export.add_argument("--no-normalize", action="store_true", help="onnx: embedder keeps the vectors' norms")
    export.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="transformers: weights' dtype (default: the preset's)",
    )
    export.add_argument(
        "--max-shard-size",
        default="2GB",
        help="transformers: largest safetensors file, e.g. 500MB (default: %(default)s)",
    )
    export.set_defaults(run=run_export)

    presets = commands.add_parser("presets", help="list the bundled and released presets")
    presets.set_defaults(run=run_presets)
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["convert"]:
            return run_convert(argv[1:])
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
