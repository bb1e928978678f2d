"""`keras-t5gemma generate`: answers to prompts, with Keras or the ONNX runtime, batched or streamed."""

import sys

import keras

from keras_t5gemma.commands.common import DEFAULT
from keras_t5gemma.commands.common import CommandError
from keras_t5gemma.commands.common import add_encoding
from keras_t5gemma.commands.common import add_preset
from keras_t5gemma.commands.common import positive_int
from keras_t5gemma.commands.common import say
from keras_t5gemma.commands.common import texts_of
from keras_t5gemma.models.samplers import SAMPLERS
from keras_t5gemma.models.samplers import make_sampler
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import START_OF_IMAGE_PIECE as IMAGE_MARKER
from keras_t5gemma.training.fine_tune import load_image
from keras_t5gemma.training.fine_tune import load_seq_2_seq_lm
from keras_t5gemma.training.fine_tune import with_image_markers


def add_parser(commands):
    parser = commands.add_parser(
        "generate",
        help="generate answers to text prompts, optionally with images",
        description="Prints one answer per prompt. Images go with every prompt; a prompt without enough "
        f"`{IMAGE_MARKER}` markers gets them appended.",
    )
    add_preset(parser)
    parser.add_argument("prompts", nargs="*", help="prompts (quote each one)")
    parser.add_argument("--file", help="a text file of prompts, one per line")
    add_encoding(parser)
    parser.add_argument("--image", action="append", metavar="PATH", help="a PNG/JPEG image (repeatable)")
    parser.add_argument("--sampler", default="greedy", choices=SAMPLERS, help=DEFAULT)
    length = "decoder length in tokens, <bos> included (default: the preset's)"
    parser.add_argument("--max-length", type=positive_int, help=length)
    parser.add_argument("--encoder-length", type=positive_int, help="encoder length in tokens (default: the preset's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="for top_k/top_p/random (default: 1.0)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="for top_k " + DEFAULT)
    parser.add_argument("--top-p", type=float, default=0.9, help="for top_p " + DEFAULT)
    parser.add_argument("--num-beams", type=positive_int, default=4, help="for beam " + DEFAULT)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="prompts per batch " + DEFAULT)
    parser.add_argument("--seed", type=int, default=0, help="for the random samplers " + DEFAULT)
    parser.add_argument("--show-prompt", action="store_true", help="print `prompt -> answer`")
    parser.add_argument("--stream", action="store_true", help="print each answer as it is generated (Keras path)")
    multi_host = (
        "join the other processes of a JAX job first (keras.distribution.initialize); each generates its part "
        "of the prompts and process 0 prints them all, in order"
    )
    parser.add_argument("--multi-host", action="store_true", help=multi_host)
    onnx = "generate with the ONNX runtime from a folder written by `export --format onnx` (instead of --preset)"
    parser.add_argument("--onnx", metavar="FOLDER", help=onnx)
    precision = (
        "with --onnx: the export's graph set to run, fp32, fp16, int8, q4 or q4f16 (default: fp32 if exported, "
        "else the first precision exported)"
    )
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8", "q4", "q4f16"), help=precision)
    parser.set_defaults(run=run_generate)


def run_generate(args):
    keras.utils.set_random_seed(args.seed)
    prompts = texts_of(args, "prompts")
    images = [load_image(path) for path in args.image or []]
    prompts = [with_image_markers(prompt, len(images)) for prompt in prompts]
    if args.precision and not args.onnx:
        raise CommandError("--precision picks the graph set of an ONNX export; it needs --onnx FOLDER")
    if args.multi_host:
        if args.onnx or args.stream:
            raise CommandError("--multi-host generates with Keras in batches; it takes neither --onnx nor --stream")
        keras.distribution.initialize()
    generate = _onnx_generate(args, images) if args.onnx else _keras_generate(args, images)
    if args.multi_host:
        return _generate_in_parts(args, prompts, generate)
    if args.stream and not args.onnx:
        for prompt in prompts:
            say(f"{prompt} -> " if args.show_prompt else "", end="")
            for piece in generate.stream(prompt):
                say(piece, end="")
            say()
        return 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        # A ValueError here (a prompt or image the preprocessor refuses) is the user's: status 2.
        for prompt, answer in zip(batch, generate(batch)):
            say(f"{prompt} -> {answer.strip()}" if args.show_prompt else answer.strip())
    return 0


def _generate_in_parts(args, prompts, generate):
    """`--multi-host`: this process's contiguous part of the prompts, then every answer printed by process 0."""
    from keras_t5gemma.evaluation import gather_texts
    from keras_t5gemma.evaluation import process_part
    from keras_t5gemma.training.checkpoints import process_index

    rows, sharded = process_part(len(prompts), generate.seq_2_seq_lm)
    mine = [prompts[i] for i in rows]
    answers = [
        answer.strip()
        for start in range(0, len(mine), args.batch_size)
        for answer in generate(mine[start : start + args.batch_size])
    ]
    if sharded:
        print(
            f"Process {process_index()} generated prompts {rows.start + 1}-{rows.stop} of {len(prompts)}.",
            file=sys.stderr,
        )
        answers = gather_texts(answers)
    if process_index() == 0:
        for prompt, answer in zip(prompts, answers):
            say(f"{prompt} -> {answer}" if args.show_prompt else answer)
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

    def stream(prompt):
        inputs = {"encoder_text": prompt, **({"images": images} if images else {})}
        return seq_2_seq_lm.stream_generate(inputs, max_length=max_length)

    generate.stream = stream
    generate.seq_2_seq_lm = seq_2_seq_lm
    return generate


def _onnx_generate(args, images):
    """`generate --onnx FOLDER`: the ONNX runtime, which needs no Keras."""
    from t5gemma_onnx import OnnxSeq2SeqLM

    if args.sampler == "beam":
        raise CommandError("the ONNX runtime samples greedy, top_k, top_p or random; beam search is Keras-only")
    try:
        model = OnnxSeq2SeqLM(args.onnx, precision=args.precision)
    except ValueError as error:  # not an export, or no such precision in it
        raise CommandError(str(error)) from None
    if images and not model.settings["vision"]:
        raise CommandError(f"the export {args.onnx} has no vision tower; it cannot take --image")
    options = {"max_length": args.max_length, "sampler": args.sampler, "seed": args.seed, "k": args.top_k}
    options.update(p=args.top_p, temperature=args.temperature)
    return lambda batch: model.generate(batch, [images] * len(batch) if images else None, **options)
