"""`keras-t5gemma export`: ONNX graphs or a `transformers` folder."""

import time
from pathlib import Path

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import EXPORT_FORMATS
from keras_t5gemma.commands.common import POOLINGS
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm


def add_parser(commands):
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
    add_preset(parser)
    parser.add_argument("output", help="folder to write (new, empty, or an earlier ONNX export)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    length = "onnx: decoder cache length in tokens, <bos> included (default: the preset's decoder sequence length)"
    parser.add_argument("--max-decode-length", type=positive_int, help=length)
    parser.add_argument("--quantize", choices=("int8",), help="onnx: weight-only int8 matmuls and embedding table")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS, help="onnx: embedder pooling " + DEFAULT)
    parser.add_argument("--no-normalize", action="store_true", help="onnx: embedder keeps the vectors' norms")
    dtype = "transformers: weights' dtype (default: the preset's)"
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help=dtype)
    shard = "transformers: largest safetensors file, e.g. 500MB " + DEFAULT
    parser.add_argument("--max-shard-size", default="2GB", help=shard)
    parser.set_defaults(run=run_export)


def run_export(args):
    """`export OUTPUT --format onnx` (serving without Keras) or `--format transformers`."""
    seq_2_seq_lm = load_seq_2_seq_lm(args.preset)
    started = time.time()
    if args.format == "onnx":
        from keras_t5gemma.export import export_onnx

        options = dict(max_decode_length=args.max_decode_length, quantize=args.quantize, pooling=args.pooling)
        settings = export_onnx(seq_2_seq_lm, args.output, normalize=not args.no_normalize, **options)
        output, then = args.output, f'try `keras-t5gemma generate --onnx {args.output} "..."`'
        what = f"ONNX opset {settings['opset']}, {settings['quantization'] or 'float32'}, decoder cache "
        what += f"{settings['max_decode_length']} tokens"
    else:
        output = seq_2_seq_lm.export_to_transformers(args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
        what, then = "for transformers", "load it with T5Gemma2ForConditionalGeneration.from_pretrained"
    size = sum(path.stat().st_size for path in Path(output).iterdir() if path.is_file()) / 2**20
    say(f"Exported {args.preset} to {output} ({what}, {size:.1f} MiB) in {time.time() - started:.1f}s; {then}.")
    return 0
