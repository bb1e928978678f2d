"""`keras-t5gemma export`: ONNX graphs, a `transformers` folder or a KerasHub preset."""

import argparse
import time
from pathlib import Path

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import EXPORT_FORMATS
from keras_t5gemma.commands.common import POOLINGS
from keras_t5gemma.commands.common import CommandError
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm


def add_parser(commands):
    parser = commands.add_parser(
        "export",
        help="export a preset for serving without Keras (ONNX), for transformers or for KerasHub",
        description="--format onnx (either family: T5Gemma 2 or the first T5Gemma) writes encoder.onnx (encoder "
        "output and cross keys/values), decoder.onnx (one "
        "step or a prompt chunk against a static self-attention cache), embedder.onnx, the tokenizer and "
        "t5gemma2_onnx.json to OUTPUT; the `t5gemma_onnx` package generates from it with numpy, onnxruntime "
        "and sentencepiece only; --precision fp32,q4 writes one graph set per precision (encoder_q4.onnx, ...) "
        "sharing the tokenizer and settings. --format transformers writes safetensors weights (LoRA merged), "
        "config.json, generation_config.json, the tokenizer and the image processor config, for "
        "T5Gemma2ForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained. --format keras-hub "
        "writes a KerasHub 0.32 preset folder for keras_hub.models.T5Gemma2Seq2SeqLM.from_preset (the vision "
        "tower included; --text-only leaves it out).",
    )
    add_preset(parser)
    parser.add_argument("output", help="folder to write (new, empty, or an earlier ONNX export)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    length = "onnx: decoder cache length in tokens, <bos> included (default: the preset's decoder sequence length)"
    parser.add_argument("--max-decode-length", type=positive_int, help=length)
    precision = (
        "onnx: comma-separated graph sets to write, of fp32 (float32), fp16 (float16 weights and activations, norms, "
        "softmax and logits float32), int8 (weight-only int8), q4 (4-bit weights in blocks of 32, float32 "
        "activations), q4f16 (4-bit weights, float16 activations) (default: fp32)"
    )
    parser.add_argument("--precision", type=_precisions, help=precision)
    parser.add_argument("--quantize", choices=("int8",), help="onnx: the same as --precision int8")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS, help="onnx: embedder pooling " + DEFAULT)
    parser.add_argument("--no-normalize", action="store_true", help="onnx: embedder keeps the vectors' norms")
    dtype = "transformers: weights' dtype (default: the preset's)"
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help=dtype)
    shard = "transformers: largest safetensors file, e.g. 500MB " + DEFAULT
    parser.add_argument("--max-shard-size", default="2GB", help=shard)
    text_only = "keras-hub: leave out the vision tower"
    parser.add_argument("--text-only", action="store_true", help=text_only)
    parser.set_defaults(run=run_export)


def run_export(args):
    """`export OUTPUT --format onnx` (serving without Keras), `--format transformers` or `--format keras-hub`."""
    if args.text_only and args.format != "keras-hub":
        raise CommandError("--text-only applies to --format keras-hub")
    if (args.precision or args.quantize) and args.format != "onnx":
        raise CommandError("--precision and --quantize apply to --format onnx (--format transformers takes --dtype)")
    seq_2_seq_lm = _text_only_model(args.preset) if args.text_only else load_seq_2_seq_lm(args.preset)
    started = time.time()
    if args.format == "onnx":
        from keras_t5gemma.export import export_onnx

        if args.precision and args.quantize:
            raise CommandError("pass --precision or --quantize, not both (--quantize int8 is --precision int8)")
        options = dict(max_decode_length=args.max_decode_length, precision=args.precision, pooling=args.pooling)
        options["quantize"] = args.quantize
        settings = export_onnx(seq_2_seq_lm, args.output, normalize=not args.no_normalize, **options)
        output, then = args.output, f'try `keras-t5gemma generate --onnx {args.output} "..."`'
        sizes = ", ".join(f"{name} {entry['bytes'] / 2**20:.1f} MiB" for name, entry in settings["precisions"].items())
        what = f"ONNX opset {settings['opset']}, {sizes}, decoder cache {settings['max_decode_length']} tokens"
    elif args.format == "keras-hub":
        output = seq_2_seq_lm.export_to_keras_hub(args.output)
        what, then = "for KerasHub", "load it with keras_hub.models.T5Gemma2Seq2SeqLM.from_preset"
    else:
        output = seq_2_seq_lm.export_to_transformers(args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
        # T5Gemma2Seq2SeqLM -> T5Gemma2ForConditionalGeneration, T5GemmaSeq2SeqLM -> T5GemmaForConditionalGeneration.
        reference = type(seq_2_seq_lm).__name__.replace("Seq2SeqLM", "ForConditionalGeneration")
        what, then = "for transformers", f"load it with {reference}.from_pretrained"
    size = sum(path.stat().st_size for path in Path(output).iterdir() if path.is_file()) / 2**20
    say(f"Exported {args.preset} to {output} ({what}, {size:.1f} MiB) in {time.time() - started:.1f}s; {then}.")
    return 0


def _precisions(text):
    """`--precision`: a comma-separated list of precisions, checked here so that a typo fails before loading."""
    from keras_t5gemma.export.onnx import parse_precisions

    try:
        return parse_precisions(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _text_only_model(preset):
    """T5Gemma 2 without its vision tower (Hugging Face checkpoints and KerasHub presets; Keras preset folders
    with a tower say they cannot)."""
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM

    return T5Gemma2Seq2SeqLM.from_preset(preset, text_only=True)
