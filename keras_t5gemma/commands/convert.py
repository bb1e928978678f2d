"""`keras-t5gemma convert`: a Hugging Face checkpoint to a Keras preset (`conversion.convert`)."""


def add_parser(commands):
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
