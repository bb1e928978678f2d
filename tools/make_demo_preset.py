"""Builds the bundled demo preset `t5gemma2_tiny_digits` with the package's own `fit`.

    python tools/make_demo_preset.py                 # writes keras_t5gemma/presets/t5gemma2_tiny_digits/

Everything is made here from nothing, deterministically (seeded):
1. a small SentencePiece vocabulary trained on the tasks' text, with Gemma's
   special ids (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3), the image pieces
   `<start_of_image>`, `<end_of_image>`, `<image_soft_token>` and byte fallback
   (any text tokenizes);
2. a tiny T5Gemma 2 (2 + 2 layers of width 64, one SigLIP layer on 16x16
   images), about 0.3M parameters;
3. `T5Gemma2Seq2SeqLM.fit` on strings and images from
   `keras_t5gemma.demo`: reverse and sort 2 to 8 digits, and name the
   colour of an image;
4. exact-match accuracy with `generate` on a held-out set (another seed, and
   only prompts that training never sees), written with the training facts to
   `DESCRIPTION` and the `training` section of `metadata.json`.

The `rotate` operation is in the vocabulary but not in training: the CLI's
`demo` teaches it by fine-tuning. A run takes 6 to 10 minutes on 2 CPU cores;
two runs wrote bit-identical weights.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

NAME = "t5gemma2_tiny_digits"
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_t5gemma", "presets", NAME
)
# "color" once in five draws: naming a colour is easy, digit tasks are not.
TRAIN_OPERATIONS = ["reverse", "sort", "reverse", "sort", "color"]
HELD_OUT_OPERATIONS = ["reverse", "sort", "color"]
IMAGE_PIECES = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Lengths used for training (the longest prompts and targets fit); the saved
# preprocessor gets roomier defaults for other prompts.
TRAIN_SEQUENCE_LENGTHS = (16, 12)
SAVED_SEQUENCE_LENGTHS = (32, 16)


def train_vocabulary(seed):
    """SentencePiece BPE proto bytes for the tasks' text, with Gemma's special pieces."""
    from keras_t5gemma import demo
    from keras_t5gemma.conversion import vocabulary

    examples = demo.make_examples([*demo.OPERATIONS, "color"], 4000, seed)
    corpus = [f"{example.prompt} {example.target}" for example in examples]
    corpus += [" ".join(demo.COLORS), "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;!?'\"()-"]
    return vocabulary.train_vocabulary(corpus, vocab_size=320, special_pieces=IMAGE_PIECES, num_threads=1)


def build_model(proto):
    """The tiny T5Gemma 2 with its preprocessor, randomly initialised."""
    from keras_t5gemma import T5Gemma2Backbone
    from keras_t5gemma import T5Gemma2ImageConverter
    from keras_t5gemma import T5Gemma2Seq2SeqLM
    from keras_t5gemma import T5Gemma2Tokenizer
    from keras_t5gemma import T5Gemma2VisionEncoder
    from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor

    tokenizer = T5Gemma2Tokenizer(proto, image_placeholder="<image_soft_token>")
    hidden_dim, image_size, tokens_per_image = 64, 16, 4
    vision_encoder = T5Gemma2VisionEncoder(
        image_size=image_size,
        patch_size=4,
        hidden_dim=32,
        intermediate_dim=64,
        num_layers=1,
        num_heads=2,
        output_dim=hidden_dim,
        mm_tokens_per_image=tokens_per_image,
    )
    layer_types = ["sliding_attention", "full_attention"]
    backbone = T5Gemma2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        hidden_dim=hidden_dim,
        intermediate_dim=256,
        num_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_encoder_layers=2,
        num_decoder_layers=2,
        encoder_layer_types=layer_types,
        decoder_layer_types=layer_types,
        sliding_window=16,
        eoi_token_id=tokenizer.end_of_image_token_id,
        image_token_id=tokenizer.image_placeholder_token_id,
        vision_encoder=vision_encoder,
    )
    encoder_length, decoder_length = TRAIN_SEQUENCE_LENGTHS
    preprocessor = T5Gemma2Seq2SeqLMPreprocessor(
        tokenizer,
        T5Gemma2ImageConverter(image_size=(image_size, image_size)),
        encoder_sequence_length=encoder_length,
        decoder_sequence_length=decoder_length,
        mm_tokens_per_image=tokens_per_image,
    )
    return T5Gemma2Seq2SeqLM(backbone, preprocessor)


def evaluate(seq_2_seq_lm, examples):
    """`(overall exact match, {operation: exact match})`."""
    from keras_t5gemma import demo

    answers = demo.generate_answers(seq_2_seq_lm, examples)
    by_operation = {}
    for operation in HELD_OUT_OPERATIONS:
        chosen = [i for i, example in enumerate(examples) if example.prompt.startswith(f"{operation}:")]
        by_operation[operation] = demo.exact_match([answers[i] for i in chosen], [examples[i] for i in chosen])
    return demo.exact_match(answers, examples), by_operation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="preset folder to write (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4000, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW rate (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="log points; each sees fresh data (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=600, help="held-out examples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the preset in a non-empty --output (the bundled one)"
    )
    args = parser.parse_args(argv)
    if args.steps % args.epochs:
        parser.error("--steps must be a multiple of --epochs")

    import keras

    # Before any tokenizer exists: seeding clears TF's caches, and with them
    # the tokenizer resources of tf.data pipelines made earlier.
    keras.utils.set_random_seed(args.seed)

    from keras_t5gemma import demo
    from keras_t5gemma.utils.safe_files import atomic_file

    started = time.time()
    proto = train_vocabulary(args.seed)
    seq_2_seq_lm = build_model(proto)
    parameters = seq_2_seq_lm.backbone.count_params()
    print(f"vocabulary {seq_2_seq_lm.preprocessor.tokenizer.vocabulary_size()} pieces, {parameters:,} parameters")

    train = demo.make_examples(TRAIN_OPERATIONS, args.steps * args.batch_size, args.seed)
    x, _ = demo.as_inputs(train)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps, warmup_target=args.learning_rate, warmup_steps=args.steps // 20, alpha=0.02
    )
    seq_2_seq_lm.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01), sampler="greedy")
    history = seq_2_seq_lm.fit(
        x,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps // args.epochs,
        shuffle=False,
        verbose=2,
    )
    training_seconds = time.time() - started

    held_out = demo.make_examples(HELD_OUT_OPERATIONS, args.held_out, args.seed + 1, held_out=True)
    accuracy, by_operation = evaluate(seq_2_seq_lm, held_out)
    print(f"held-out exact match {accuracy:.4f} {by_operation}")

    preprocessor = seq_2_seq_lm.preprocessor
    preprocessor.encoder_sequence_length, preprocessor.decoder_sequence_length = SAVED_SEQUENCE_LENGTHS
    seq_2_seq_lm.save_to_preset(args.output, overwrite=args.overwrite)
    arguments = sys.argv[1:] if argv is None else argv
    command = " ".join(["python tools/make_demo_preset.py", *arguments])
    training = {
        "task": (
            "'reverse: 3 1 4' -> '4 1 3' and 'sort: 3 1 4' -> '1 3 4' on 2 to 8 digits (40% each), and "
            f"'color: <start_of_image>' with an image -> its colour ({', '.join(demo.COLORS)}; 20%)"
        ),
        "vocabulary": "SentencePiece BPE with byte fallback, trained on the tasks' text by this command",
        "parameters": parameters,
        "train_examples": len(train),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW, weight decay 0.01, cosine decay from {args.learning_rate} after 5% warmup",
        "train_sequence_lengths": list(TRAIN_SEQUENCE_LENGTHS),
        "final_loss": round(float(history.history["loss"][-1]), 4),
        "seed": args.seed,
        "held_out": {
            "operations": HELD_OUT_OPERATIONS,
            "examples": args.held_out,
            "seed": args.seed + 1,
            "selection": "digit prompts with crc32(prompt) % 8 == 0, never seen in training "
            "(keras_t5gemma.demo.is_held_out); fresh random images",
            "exact_match": round(accuracy, 4),
            "exact_match_by_operation": {name: round(value, 4) for name, value in by_operation.items()},
            "sampler": "greedy",
        },
        "seconds": round(training_seconds),
        "machine": f"{os.cpu_count()} CPU cores, Keras {keras.__version__} on {keras.config.backend()}",
        "command": command,
    }
    metadata_path = os.path.join(args.output, "metadata.json")
    with open(metadata_path, encoding="utf-8") as file:
        metadata = json.load(file)
    metadata["training"] = training
    with atomic_file(metadata_path, "w", encoding="utf-8") as file:
        json.dump(metadata, file, indent=4)
    description = (
        f"Tiny T5Gemma 2 ({parameters / 1e6:.2f}M parameters, vision tower included) trained from scratch "
        "to reverse and sort digit sequences and name an image's colour; a demo, not a language model.\n\n"
        f"Task: {training['task']}\n"
        f"Training: {args.steps} steps of {args.batch_size} ({len(train):,} examples), "
        f"{training['optimizer']}, {training_seconds / 60:.1f} min on {training['machine']}.\n"
        f"Held-out exact match (greedy, {args.held_out} examples, seed {args.seed + 1}, prompts never seen in "
        f"training): {accuracy:.1%} ("
        + ", ".join(f"{name} {value:.1%}" for name, value in by_operation.items())
        + f").\nMade by: {command}\n"
        "Details: the `training` section of metadata.json.\n"
    )
    with atomic_file(os.path.join(args.output, "DESCRIPTION"), "w", encoding="utf-8") as file:
        file.write(description)
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(args.output) for name in names)
    print(f"saved {args.output} ({size / 1e6:.2f} MB) in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
