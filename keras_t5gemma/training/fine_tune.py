"""`fine_tune`: the resumable, mesh-aware fine-tuning that `keras-t5gemma fine-tune` runs.

A notebook or a TPU job script calls `fine_tune(...)` with the same effect as
the command: the examples shuffled by `seed`, each run's training state saved
after every epoch as sharded Orbax checkpoints in its own folder
`OUTPUT/runs/run_NNN/checkpoints/`, `resume=True` continuing the last run from
its last complete checkpoint, training data parallel over several devices or
on a `BATCHxMODEL` mesh, and the final model saved to `OUTPUT` as a preset
(LoRA adapters merged). `task="classify"` / `"classify-tokens"` fine-tunes a
text or token classifier instead (one process, saved at the end).

Example:
```python
import tempfile

pairs = [("rotate: 1 2 3", "2 3 1"), ("rotate: 4 5 6", "5 6 4")] * 4
result = fine_tune(
    pairs, tempfile.mkdtemp(), epochs=1, batch_size=4, encoder_length=16, decoder_length=8, verbose=0, log=None
)
assert os.path.basename(result.run) == "run_001" and len(result.history.history["loss"]) == 1
```
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import warnings

import keras
import numpy as np

from keras_t5gemma.data import DEFAULT_ENCODING
from keras_t5gemma.data import TEXT_SUFFIXES
from keras_t5gemma.data import check_pairs
from keras_t5gemma.data import number_classes
from keras_t5gemma.data import read_image
from keras_t5gemma.data import read_labelled
from keras_t5gemma.data import read_pairs
from keras_t5gemma.evaluation import DEFAULT_METRICS
from keras_t5gemma.evaluation import best_score_name
from keras_t5gemma.evaluation import check_metrics
from keras_t5gemma.evaluation import evaluate
from keras_t5gemma.evaluation import read_examples
from keras_t5gemma.evaluation import read_history
from keras_t5gemma.evaluation import write_curves
from keras_t5gemma.evaluation import write_history
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import pil_image_to_rgb
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import TruncationWarning
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import START_OF_IMAGE_PIECE as IMAGE_MARKER
from keras_t5gemma.training import checkpoints as training_checkpoints
from keras_t5gemma.training import distribution as training_distribution
from keras_t5gemma.training import input_pipeline
from keras_t5gemma.training import objectives
from keras_t5gemma.training import packing
from keras_t5gemma.utils.safe_files import writer_lock

DEFAULT_PRESET = "t5gemma2_tiny_digits"
TASKS = ("generate", "classify", "classify-tokens")


@dataclasses.dataclass
class FineTuneResult:
    """What `fine_tune` did.

    Attributes:
        model: the trained task (`T5Gemma2Seq2SeqLM`, `T5GemmaSeq2SeqLM` or a
            classifier), LoRA adapters still separate (merged when saved).
        history: `keras.callbacks.History` of the epochs this call trained.
        run: str or None, the run folder `OUTPUT/runs/run_NNN` (None for a
            classifier, which keeps no checkpoints).
        initial_epoch: int, the epochs the run had done before this call
            (restored from its last checkpoint with `resume=True`).
        saved: bool, whether the final model was written to `OUTPUT` (not
            when several processes hold the weights' shards).
    """

    model: keras.Model
    history: keras.callbacks.History
    run: str | None
    initial_epoch: int
    saved: bool


class FineTuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during `fine_tune`: the run stopped; `checkpoint` (or None) is its last complete one."""

    def __init__(self, run, checkpoint, epoch, epochs):
        self.run, self.checkpoint, self.epoch, self.epochs = run, checkpoint, epoch, epochs
        super().__init__(
            f"the last complete checkpoint is {checkpoint} (epoch {epoch} of {epochs})"
            if checkpoint
            else f"no checkpoint was completed in {run}"
        )


def load_seq_2_seq_lm(preset, dtype=None, remat=False):
    """The task of the preset's generation: `T5GemmaSeq2SeqLM` for T5Gemma (first generation), else T5Gemma 2's.

    `dtype` (a dtype policy name such as `"mixed_bfloat16"`) replaces the
    preset's; `remat=True` recomputes each layer's activations in the
    backward pass instead of keeping them.
    """
    from keras_t5gemma.models.auto import load_seq_2_seq_lm as load

    return load(preset, **_load_options(dtype, remat))


def _load_options(dtype, remat):
    """`from_preset`'s options: only those given, so that the preset's own settings stay otherwise."""
    return {**({"dtype": dtype} if dtype else {}), **({"remat": True} if remat else {})}


def load_image(path, size=None):
    """An image file's RGB uint8 pixels `(H, W, 3)`, converted as the Python API converts PIL images;
    resized (Pillow bilinear) to `size`, `(height, width)`, if given."""
    return _pixels(read_image(path), size)


def _pixels(image, size=None):
    """RGB uint8 pixels of a PIL image or an array, resized to `size` if given."""
    from PIL import Image

    pixels = pil_image_to_rgb(image) if isinstance(image, Image.Image) else np.asarray(image, "uint8")
    if size is not None and pixels.shape[:2] != tuple(size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return pixels


def with_image_markers(prompt, images):
    """`prompt` with a `<start_of_image>` appended for each of its `images` (a count) it has no marker for."""
    missing = images - prompt.count(IMAGE_MARKER)
    if missing < 0:
        raise ValueError(f"the prompt {prompt!r} has more {IMAGE_MARKER} markers than the {images} image(s) given")
    return " ".join([prompt, *[IMAGE_MARKER] * missing]) if missing else prompt


def fit_verbosity(verbose):
    """Keras' progress bar on a terminal; one line per epoch in logs, where the bar would print every update."""
    if verbose != "auto":
        return verbose
    return 1 if sys.stdout.isatty() else 2


def _log_to(log):
    return log if log is not None else (lambda *args, **kwargs: None)


def fine_tune(
    data,
    output,
    *,
    preset=DEFAULT_PRESET,
    task="generate",
    epochs=3,
    batch_size=16,
    learning_rate=2e-4,
    weight_decay=0.01,
    lora_rank=None,
    train_vision_tower=False,
    encoder_length=None,
    decoder_length=None,
    dtype=None,
    remat=False,
    keep_checkpoints=2,
    eval_data=None,
    eval_metrics=DEFAULT_METRICS,
    keep_best=None,
    resume=False,
    overwrite=False,
    mesh=None,
    multi_host=False,
    seed=0,
    verbose="auto",
    log=print,
    encoding=DEFAULT_ENCODING,
    stream=None,
    shuffle_buffer=input_pipeline.DEFAULT_SHUFFLE_BUFFER,
    checkpoint_every=None,
    objective=None,
    pack=False,
):
    """Fine-tunes a preset on input/target pairs (or labelled texts) and saves it to `output`.

    Args:
        data: a `.jsonl` or `.csv` file of input/target pairs (see
            `keras_t5gemma.data.read_pairs`), or the pairs themselves:
            `(input, target)` or `(input, target, image)` tuples, an image
            being a file path, a PIL image or `(H, W, 3)` uint8 pixels. For the
            classifiers, a `.jsonl` file (`keras_t5gemma.data.read_labelled`)
            or `(input, label)` pairs.
        output: str, the folder of the runs and of the final model.
        preset: str, a preset name, preset folder or `hf://` handle.
        task: `"generate"` (a `Seq2SeqLM`), `"classify"` (a
            `T5Gemma2TextClassifier`) or `"classify-tokens"` (a
            `T5Gemma2TokenClassifier`, a label per whitespace-separated word).
        epochs: int, the run's epochs in all (with `resume`, it may grow).
        batch_size: int, the global batch (a multiple of the mesh's batch axis).
        learning_rate, weight_decay: AdamW's.
        lora_rank: int or None, train LoRA adapters of this rank instead of
            all weights (merged into the saved kernels).
        train_vision_tower: bool, train the vision tower too (default: frozen).
        encoder_length, decoder_length: int or None, sequence lengths
            (default: the preset's); longer texts are truncated, and `log`
            says how many were cut and by how much (without `log`, `fit`
            warns).
        dtype: str or None, a dtype policy for the model, e.g.
            `"mixed_bfloat16"` (the saved model keeps it).
        remat: bool, recompute each layer's activations in the backward pass
            instead of keeping them (less memory, more compute).
        keep_checkpoints: int, the epoch checkpoints of this run to keep.
        eval_data: held-out pairs (a file or tuples, as `data`) to score after
            every epoch with `keras_t5gemma.evaluation.evaluate` (greedy), or
            None. The scores join the history as `eval_<score>`.
        eval_metrics: the metrics for `eval_data` (`evaluation.METRICS`).
        keep_best: a score name (`"exact"`, `"rougeL"`, `"bleu"`, ...) or a
            metric (`"rouge"`: ROUGE-L): keep the checkpoint of the epoch with
            the highest one in `RUN/best/EPOCH`, beside the last ones. Every
            run folder also gets `history.csv` (the loss and every score,
            every epoch) and `curves.png` (with matplotlib).
        resume: bool, continue the last run in `output` from its last complete
            checkpoint (same settings); starts a run if `output` is empty.
        overwrite: bool, write into a non-empty `output`: a new run beside the
            earlier ones, and the final model's files.
        mesh: `"BATCHxMODEL"`, `(batch, model)` or None: shard the model over
            a mesh of all devices (default: data parallel over all devices).
        multi_host: bool, join the other hosts of a pod first
            (`keras.distribution.initialize`). Every host calls `fine_tune`.
        seed: int, shuffling and initialisation.
        verbose: `"auto"`, 0, 1 or 2, Keras' progress output in `fit`
            (`"auto"`: a bar on a terminal, else a line per epoch).
        log: a `print`-like function for the run's summary lines, or None.
        encoding: str, the text encoding of a `data` file (a UTF-8
            byte-order mark is dropped).
        stream: bool or None, read `data` as a stream
            (`training.input_pipeline.ExampleStream`: never all in memory,
            shuffled in windows of `shuffle_buffer` records, each process
            reading its shard, the position saved with every checkpoint so
            that `resume` goes on with the next unseen example). None:
            streamed when `data` is a glob, a list of files, a Parquet file or
            a file over 1 GiB (`input_pipeline.streams_by_default`). `data`
            may also be an `ExampleStream`. Text pairs only (no images).
        shuffle_buffer: int, a streamed run's shuffle window (records).
        checkpoint_every: int or None, a streamed run also saves a checkpoint
            every this many steps (and after each epoch).
        objective: None (input/target pairs), or `"prefix-lm"` / `"ul2"`:
            continued pretraining on raw text, `data` being `.txt` files (a
            document per line) or JSONL `{"text": ...}` files (or globs),
            streamed, each document drawn into a pair by the T5Gemma papers'
            denoisers (`training.objectives`).
        pack: bool, pack several examples into each row of
            `encoder_length`/`decoder_length` tokens (`training.packing`:
            greedy first fit, attention and positions kept per example)
            instead of padding each to its own row, and average the loss
            over target tokens; `batch_size` then counts rows. On one
            process. Streamed pairs and `objective` draws are packed as
            they come, each batch the next examples that fit its rows
            (`input_pipeline.PackedStream`), so that a resumed run sees
            every example once per epoch.

    Returns:
        A `FineTuneResult`: the model, the history, the run folder.

    Raises:
        ValueError: for bad data (naming the file and line), settings that
            disagree with the run to resume, or a folder in the way; with
            `resume`, when no checkpoint of the run reads (a damaged newest
            one is set aside with a warning and the one before restored).
        FolderInUseError: another process is writing `output`.
        OSError: a disk too full for a checkpoint or the final model.
        FineTuneInterrupted: on Ctrl-C; the last complete checkpoint is kept.
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {', '.join(TASKS)}; got {task!r}")
    if not 0.0 < learning_rate < 1.0:
        raise ValueError("--learning-rate must be in (0, 1)")
    if keep_best and eval_data is None:
        raise ValueError("--keep-best compares scores on --eval data: give both")
    if task != "generate":
        if eval_data is not None:
            raise ValueError(f"--eval scores generated answers; --task {task} does not generate")
        if objective or stream or checkpoint_every:
            raise ValueError(
                f"--task {task} reads its labelled data in memory: drop --objective, --stream, --checkpoint-every"
            )
        if resume or mesh or multi_host:
            raise ValueError(
                f"--task {task} trains on one process and saves at the end: drop --resume, --mesh and --multi-host"
            )
        return fine_tune_classifier(
            data,
            output,
            preset=preset,
            per_word=task == "classify-tokens",
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            lora_rank=lora_rank,
            encoder_length=encoder_length,
            dtype=dtype,
            remat=remat,
            seed=seed,
            verbose=verbose,
            log=log,
            encoding=encoding,
        )
    report_truncation = log is not None
    log = _log_to(log)
    if resume and overwrite:
        raise ValueError("--resume continues the last run in --output, --overwrite starts a new one: give one")
    if multi_host:
        # Reads KERAS_DISTRIBUTION_* (or, on a Cloud TPU pod, finds the other hosts itself).
        keras.distribution.initialize()
    mesh_shape = training_distribution.parse_mesh(mesh) if isinstance(mesh, str) else mesh
    distribution = training_distribution.make_distribution(tuple(mesh_shape) if mesh_shape else None)
    output = os.fspath(output)
    # Every process checks before any creates its run folder; process 0's answer counts.
    refusal = ""
    try:
        training_checkpoints.check_output_folder(output, overwrite=overwrite, resume=resume)
    except ValueError as error:
        refusal = str(error)
    if training_checkpoints.agree(bool(refusal)):
        raise ValueError(refusal or f"process 0 refused --output {output}")
    data_axis = training_distribution.batch_axis_size(distribution)
    if batch_size % data_axis:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the mesh's batch axis ({data_axis})")
    parts, shard = training_distribution.data_shards(distribution)
    if objective is not None and stream is False:
        raise ValueError(f"--objective {objective} reads its corpus as a stream: drop stream=False")
    streamed = (
        isinstance(data, input_pipeline.ExampleStream)
        or objective is not None
        or (input_pipeline.streams_by_default(data) if stream is None else stream)
    )
    if checkpoint_every and not streamed:
        raise ValueError("--checkpoint-every saves a streamed run's position within an epoch: add --stream")
    if pack and parts > 1:
        raise ValueError(
            "--pack packs on one process (each would pack into its own number of steps): drop --multi-host"
        )
    if streamed:
        examples = data
        if not isinstance(data, input_pipeline.ExampleStream):
            examples = input_pipeline.ExampleStream(
                data,
                batch_size=batch_size,
                seed=seed,
                shuffle_buffer=shuffle_buffer,
                # Packed batches always have `batch_size` rows.
                drop_remainder=distribution is not None and not pack,
                shard_index=shard,
                shard_count=parts,
                encoding=encoding,
                **_objective_reading(objective, seed),
            )
        pairs, source, digest = None, examples.source, examples.fingerprint()
    else:
        pairs, source, digest = _pairs(data, encoding)
    # Checked before anything trains: the metrics' libraries, the score to keep the best by, the data.
    eval_examples = read_examples(eval_data) if eval_data is not None else None
    if eval_examples is not None:
        eval_metrics = check_metrics(eval_metrics)
        if keep_best:
            best_score_name(keep_best, eval_metrics)
    settings = {
        "preset": preset,
        "data_sha256": digest,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "lora_rank": lora_rank,
        "encoder_length": encoder_length,
        "decoder_length": decoder_length,
        "seed": seed,
        # None for a run read in memory: the settings of runs from before streaming still match.
        "stream_shuffle_buffer": examples.shuffle_buffer if streamed else None,
        "objective": objective,
        # None unpacked: the settings of runs from before packing still match.
        "pack": True if pack else None,
    }
    run = _run_to_continue(output, settings) if resume else None
    # Seed before anything builds a tokenizer: seeding clears TF's caches.
    keras.utils.set_random_seed(seed)
    if not streamed:
        order = np.random.default_rng(seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    if distribution is not None and not streamed:
        # Each process feeds its rows of every complete global batch.
        rows = training_distribution.process_rows(len(pairs), batch_size, distribution)
        if not rows:
            raise ValueError(f"{source} has {len(pairs)} examples, fewer than one batch of {batch_size}")
        pairs = [pairs[row] for row in rows]
    # One writer per output folder: a second run into it refuses while this one works (process 0 holds it).
    only_writer = writer_lock(output, "--output folder") if training_checkpoints.process_index() == 0 else None
    with only_writer or contextlib.nullcontext(), distribution.scope() if distribution else contextlib.nullcontext():
        seq_2_seq_lm = load_seq_2_seq_lm(preset, dtype, remat)
        x = _seq_2_seq_inputs(seq_2_seq_lm, pairs or [], source, preset, encoder_length, decoder_length)
        truncation = not streamed and seq_2_seq_lm.preprocessor.truncation(x["encoder_text"], x["decoder_text"])
        if truncation and report_truncation:
            log(f"Truncated: {truncation.message('--encoder-length', '--decoder-length')}")
        # Before `enable_lora`, so that a trained vision tower gets adapters too.
        seq_2_seq_lm.train_vision_tower = train_vision_tower
        if lora_rank:
            seq_2_seq_lm.backbone.enable_lora(lora_rank)
        y = sample_weight = None
        if pack and streamed:
            examples = input_pipeline.PackedStream(examples, seq_2_seq_lm.preprocessor)
        elif pack:
            x, y, sample_weight = _packed_inputs(seq_2_seq_lm, x, source, log)
        seq_2_seq_lm.compile(
            optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay),
            sampler="greedy",
            **({"loss": packing.token_mean_loss()} if pack else {}),
        )
        seq_2_seq_lm.optimizer.build(seq_2_seq_lm.trainable_variables)
        if run is None:
            run = training_checkpoints.start_run(output, settings)
        checkpoints = training_checkpoints.TrainingCheckpoints(os.path.join(run, "checkpoints"), keep=keep_checkpoints)
        done = restored = checkpoints.restore(seq_2_seq_lm, warn=_warn) if checkpoints.latest_step() else 0
        position = input_pipeline.StreamPosition()
        if streamed and done:
            state = checkpoints.input_position(done)
            if state is None:
                raise ValueError(f"--resume: {checkpoints.path(done)} has no input position ({done}.input.json)")
            position = examples.position_of(state)
            done = position.epoch
        report = _EpochReport(run, done, eval_examples, eval_metrics, keep_best, batch_size, log)
        trainable = sum(int(np.prod(weight.shape)) for weight in seq_2_seq_lm.trainable_weights)
        where = f" on {distribution.device_mesh.shape} devices (batch, model)" if distribution is not None else ""
        count = examples.total if streamed else len(pairs) * parts
        log(
            f"Fine-tuning {preset} on {count:,} examples from {source}{where}: "
            f"{epochs} epoch(s) of batch {batch_size}, learning rate {learning_rate}, "
            f"{trainable:,} trainable parameters"
            + (f" (LoRA rank {lora_rank})" if lora_rank else "")
            + (f"; streamed in shuffle windows of {examples.shuffle_buffer:,}" if streamed else "")
            + (f", packed into batches of {batch_size} rows" if pack and streamed else "")
            + (f"; resuming {run} after epoch {done}" if done and not position.example else "")
            + (f"; resuming {run} at example {position.example:,} of epoch {done + 1}" if position.example else "")
            + ("" if done or position.example else f"; checkpoints in {run}")
            + "."
        )
        try:
            with warnings.catch_warnings():
                if report_truncation:  # said once above
                    warnings.simplefilter("ignore", TruncationWarning)
                if streamed:
                    history = input_pipeline.fit_stream(
                        seq_2_seq_lm,
                        examples,
                        epochs=epochs,
                        start=position,
                        checkpoints=checkpoints,
                        checkpoint_every=checkpoint_every,
                        callbacks=[report],
                        verbose=fit_verbosity(verbose),
                        start_step=restored,
                    )
                else:
                    history = seq_2_seq_lm.fit(
                        x,
                        y,
                        sample_weight=sample_weight,
                        batch_size=batch_size // parts,
                        epochs=epochs,
                        initial_epoch=done,
                        shuffle=False,
                        callbacks=[checkpoints.callback(), report],
                        verbose=fit_verbosity(verbose),
                    )
        except KeyboardInterrupt:
            last = checkpoints.latest_step()
            # A streamed run numbers its checkpoints by step (a packed one's epochs vary: its position says).
            if streamed and last:
                steps = examples.steps_per_epoch
                epoch = last // steps if steps else checkpoints.input_position(last)["epoch"]
            else:
                epoch = last
            raise FineTuneInterrupted(run, checkpoints.path(last) if last else None, epoch, epochs) from None
        losses = ", ".join(f"{loss:.4f}" for loss in history.history.get("loss", []))
        log(
            (f"Loss per epoch: {losses}." if losses else f"The run had finished its {done} epoch(s) already.")
            + f"\nCheckpoints of this run: {checkpoints.directory}."
        )
        saved = training_checkpoints.process_count() == 1
        if saved:
            # OUTPUT holds the runs: the preset's files are replaced, the runs kept.
            seq_2_seq_lm.save_to_preset(output, overwrite=True)
        else:
            log(
                "Several processes hold the weights' shards; the checkpoint holds the whole model. Run the same "
                f"command with --resume on one host to write the final model to {output}."
            )
    return FineTuneResult(seq_2_seq_lm, history, run, done, saved)


def _packed_inputs(seq_2_seq_lm, x, source, log):
    """`(x, y, sample_weight)`: the texts preprocessed, then packed into rows (`packing.pack_examples`)."""
    if "images" in x:
        raise ValueError(f"{source} has images; --pack packs text pairs only")
    x, y, sample_weight = seq_2_seq_lm.preprocessor(x)
    count = len(y)
    x, y, sample_weight = packing.pack_examples(x, y, sample_weight)
    padded = packing.padding_fraction(np.concatenate([x["encoder_padding_mask"], x["decoder_padding_mask"]], axis=1))
    log(f"Packed {count:,} examples into {len(y):,} rows ({padded:.0%} padding).")
    return x, y, sample_weight


def _warn(message):
    """A warning of the run (a checkpoint set aside) on standard error, as the command prints them."""
    print(f"keras-t5gemma: warning: {message}", file=sys.stderr, flush=True)


def _pairs(data, encoding=DEFAULT_ENCODING):
    """`(pairs, source, digest)`: `[(input, target, image or None)]` of a file or in-memory pairs, where they
    come from (for messages) and a SHA-256 that a resumed run must match."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        pairs = read_pairs(path, image_marker=IMAGE_MARKER, encoding=encoding)
        with open(path, "rb") as file:
            return pairs, path, hashlib.sha256(file.read()).hexdigest()
    pairs, digest = check_pairs(data, image_marker=IMAGE_MARKER), hashlib.sha256()
    for text, target, image in pairs:
        digest.update(json.dumps([text, target]).encode())
        digest.update(
            image.encode() if isinstance(image, str) else _pixels(image).tobytes() if image is not None else b""
        )
    return pairs, "the data", digest.hexdigest()


def _objective_reading(objective, seed):
    """`ExampleStream`'s options for a continued-pretraining objective's corpus (none for pairs)."""
    if objective is None:
        return {}
    return {
        "example": objectives.document_of_record,
        "collate": objectives.ObjectiveBatches(objective, seed),
        "suffixes": TEXT_SUFFIXES,
    }


def _run_to_continue(output, settings):
    """The last run under `output` (after checking its settings), or None."""
    run = training_checkpoints.latest_run(output)
    if run is None:
        return None
    saved = training_checkpoints.read_run_settings(run)
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in settings.items() if saved.get(key) != value]
    if changed:
        raise ValueError(
            f"--resume: {run} was started with other settings ({'; '.join(changed)}); "
            "give the same ones, or start a new run without --resume"
        )
    return run


def _seq_2_seq_inputs(seq_2_seq_lm, pairs, source, preset, encoder_length, decoder_length):
    """`fit`'s `x` for the pairs: texts, and images (one slot per sample) when any pair has one."""
    preprocessor = seq_2_seq_lm.preprocessor
    if encoder_length:
        preprocessor.encoder_sequence_length = encoder_length
    if decoder_length:
        preprocessor.decoder_sequence_length = decoder_length
    converter = preprocessor.image_converter
    image_size = None if converter is None else tuple(converter.image_size)
    placeholder = preprocessor.tokenizer.image_placeholder_token
    for text, _, _ in pairs:
        if placeholder and placeholder in text:
            raise ValueError(f"{source}: the input {text!r} holds {placeholder}, which is reserved for images")
    has_images = any(image is not None for _, _, image in pairs)
    if has_images and image_size is None:
        raise ValueError(f"{source} has images but the preset {preset} has no vision tower")
    x = {
        "encoder_text": [with_image_markers(text, 1) if image is not None else text for text, _, image in pairs],
        "decoder_text": [target for _, target, _ in pairs],
    }
    if has_images:
        # A dense array of one image slot per sample; samples without an image leave it unused.
        images = np.zeros((len(pairs), 1, *image_size, 3), "uint8")
        for row, (_, _, image) in enumerate(pairs):
            if isinstance(image, str):
                images[row, 0] = load_image(image, image_size)
            elif image is not None:
                images[row, 0] = _pixels(image, image_size)
        x["images"] = images
    return x


def _classifier_class(preset, per_word):
    from keras_t5gemma.models.auto import classifier_class

    return classifier_class(preset, per_word)


def fine_tune_classifier(
    data,
    output,
    *,
    preset=DEFAULT_PRESET,
    per_word=False,
    epochs=3,
    batch_size=16,
    learning_rate=2e-4,
    weight_decay=0.01,
    lora_rank=None,
    encoder_length=None,
    dtype=None,
    remat=False,
    seed=0,
    verbose="auto",
    log=print,
    encoding=DEFAULT_ENCODING,
):
    """Fine-tunes a `T5Gemma2TextClassifier` (or with `per_word` a `T5Gemma2TokenClassifier`) and saves it to `output`.

    `fine_tune(task="classify" / "classify-tokens")` calls it. `data` is a
    `.jsonl` file (`keras_t5gemma.data.read_labelled`) or `(input, label)`
    pairs, a label being a class index or name (with `per_word`, a list of
    them, one per whitespace-separated word); class names are numbered in
    order of first appearance and saved as the classifier's `labels`. It
    trains on one process and keeps no checkpoints; the other arguments are
    `fine_tune`'s.

    Returns:
        A `FineTuneResult` (its `run` is None).
    """
    from keras_t5gemma.utils.preset_utils import resolve_preset

    log = _log_to(log)
    if isinstance(data, (str, os.PathLike)):
        source = os.fspath(data)
        texts, labels, names = read_labelled(source, per_word, encoding)
    else:
        source = "the data"
        examples = []
        for number, pair in enumerate(data):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"the data's example {number}: expected an (input, label) pair; got {pair!r}")
            examples.append((f"the data's example {number}", *pair))
        if not examples:
            raise ValueError("the data has no examples")
        texts, labels, names = number_classes(examples, per_word)
    resolve_preset(preset)
    keras.utils.set_random_seed(seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    flat = [value for label in labels for value in (label if per_word else [label])]
    num_classes = len(names) if names else max(flat) + 1
    classifier = _classifier_class(preset, per_word).from_preset(
        preset, num_classes=num_classes, labels=names, **_load_options(dtype, remat)
    )
    if encoder_length:
        classifier.preprocessor.sequence_length = encoder_length
    if lora_rank:
        classifier.backbone.enable_lora(lora_rank)
    kind = "token classifier" if per_word else "classifier"
    log(
        f"Fine-tuning a {num_classes}-class {kind} from {preset} on {len(texts):,} examples from "
        f"{source}: {epochs} epoch(s) of batch {batch_size}, learning rate {learning_rate}."
    )
    classifier.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay))
    history = classifier.fit(
        texts,
        labels if per_word else np.array(labels),
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=fit_verbosity(verbose),
    )
    classifier.save_to_preset(os.fspath(output))
    accuracy = next(values[-1] for name, values in history.history.items() if "accuracy" in name)
    log(f"Training accuracy after the last epoch: {accuracy:.1%}.")
    return FineTuneResult(classifier, history, None, 0, True)


class _EpochReport(keras.callbacks.Callback):
    """After each epoch: the scores on the evaluation data, the best checkpoint, `history.csv` and `curves.png`.

    Every process generates and scores (as `keras_t5gemma.evaluation.evaluate` does in a
    job) and agrees with process 0 on keeping the best; process 0 writes the
    files. A resumed run keeps the rows of the epochs its checkpoint holds.
    """

    def __init__(self, run, done, examples, metrics, keep_best, batch_size, log):
        super().__init__()
        self.history_path = os.path.join(run, "history.csv")
        self.curves_path = os.path.join(run, "curves.png")
        self.rows = [row for row in read_history(self.history_path) if row["epoch"] <= done]
        self.examples, self.metrics, self.log = examples, metrics, log
        self.batch_size = min(batch_size, len(examples)) if examples else batch_size
        self.best = f"eval_{best_score_name(keep_best, metrics)}" if keep_best else None
        self.best_value = max((row[self.best] for row in self.rows if self.best in row), default=None)
        self.best_checkpoints = (
            training_checkpoints.TrainingCheckpoints(os.path.join(run, "best"), keep=1) if keep_best else None
        )
        self.plot = True

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        if self.examples:
            result = evaluate(self.model, self.examples, self.metrics, self.batch_size, progress=False)
            # In the logs, the history and the progress bar's epoch line show them too.
            logs.update({f"eval_{name}": value for name, value in result.scores.items()})
            scores = ", ".join(f"{name} {value:.2f}" for name, value in result.scores.items())
            self.log(f"Epoch {epoch + 1}, {len(self.examples)} evaluation examples: {scores}.")
        if self.best and training_checkpoints.agree(self.best_value is None or logs[self.best] > self.best_value):
            self.best_value = logs[self.best]
            path = self.best_checkpoints.save(self.model, epoch + 1)
            self.log(f"Best {self.best.removeprefix('eval_')} so far ({self.best_value:.2f}): checkpoint {path}.")
        self.rows.append({"epoch": epoch + 1, **{name: float(value) for name, value in logs.items()}})
        if training_checkpoints.process_index() != 0:
            return
        write_history(self.history_path, self.rows)
        if self.plot:
            try:
                write_curves(self.curves_path, self.rows)
            except ImportError as error:
                self.plot = False
                self.log(f"No curves.png: {error}")
