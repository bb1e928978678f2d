"""`T5Gemma2Task`: the one base of every task of both T5Gemma families.

What a task does besides its own head lives here, once: text-only input to
a vision model, `quantize`, `export_to_transformers`, the frozen vision
tower, the in-memory input pipeline of `fit` (shuffled every epoch) and of
`predict` (Python samples preprocessed in batches), and reading a saved
task's settings from a preset. Each task declares this base (the
classifiers through `models/classification.py`, built on it) and KerasHub's
kind of task (`class SequenceClassifierTask(ClassifierTask, TextClassifier)`).
"""

import keras
import numpy as np

from keras_t5gemma.models.quantization import gptq_quantize
from keras_t5gemma.models.quantization import quantize_projections
from keras_t5gemma.utils.keras_hub_compat import KerasPresetLoader
from keras_t5gemma.utils.keras_hub_compat import check_config_class
from keras_t5gemma.utils.keras_hub_compat import check_file_exists
from keras_t5gemma.utils.keras_hub_compat import load_json
from keras_t5gemma.utils.keras_hub_compat import tf
from keras_t5gemma.utils.preset_utils import PresetMixin
from keras_t5gemma.utils.preset_utils import get_exporter


def _rows(samples, rows):
    """`rows` (a slice) of each list in `samples` (a dict of lists, or a list)."""
    if isinstance(samples, dict):
        return {key: value[rows] for key, value in samples.items()}
    return samples[rows]


def is_model_input(x):
    """Whether `x` is a batch the backbone takes (token ids), not samples for the preprocessor."""
    return isinstance(x, dict) and "encoder_token_ids" in x


def export_to_transformers(model, path, dtype=None, max_shard_size="2GB", overwrite=False):
    """Writes a Hugging Face `transformers` folder of `model` (a backbone or task).

    The folder holds safetensors weights (LoRA merged; sharded with
    `model.safetensors.index.json` above `max_shard_size`), `config.json`
    and, for a task with a preprocessor, the tokenizer files and (vision
    models) `processor_config.json`. A backbone or a `T5Gemma2Seq2SeqLM`
    loads with `T5Gemma2ForConditionalGeneration.from_pretrained`, a
    `T5Gemma2Embedder` with `AutoModel.from_pretrained` (`T5Gemma2Encoder`),
    a `T5Gemma2TextClassifier` / `T5Gemma2TokenClassifier` with
    `T5Gemma2ForSequenceClassification` / `T5Gemma2ForTokenClassification`
    (the head as `score.out_proj`, `labels` as `id2label`). The first
    family's classes load with their `T5Gemma*` counterparts
    (`T5GemmaForConditionalGeneration`, `T5GemmaEncoderModel`, and the
    classifiers with `is_encoder_decoder` false when the backbone has no
    decoder).

    Args:
        path: the folder to write; it must not exist or be empty, unless
            `overwrite=True` and it holds an earlier export.
        dtype: `"float32"`, `"bfloat16"` or `"float16"`; defaults to the
            weights' dtype.
        max_shard_size: bytes, or a string such as `"2GB"` or `"500MB"`.
        overwrite: replace an earlier export at `path`.

    Raises:
        ValueError: for an int8-quantized model (export the float model),
            a text-only model (`transformers` always builds the vision
            tower), or a folder that is in the way.
    """
    return get_exporter("transformers")(model, path, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)


def saved_task_config(loader, cls):
    """The config in a Keras preset's `task.json` if it holds a `cls`, else `{}`."""
    if not isinstance(loader, KerasPresetLoader) or not check_file_exists(loader.preset, "task.json"):
        return {}
    task_config = load_json(loader.preset, "task.json")
    return task_config["config"] if issubclass(check_config_class(task_config), cls) else {}


def _as_arrays(structure):
    """Dicts and tuples of samples with each leaf as one array (lists of strings included)."""
    if isinstance(structure, dict):
        return {key: _as_arrays(value) for key, value in structure.items()}
    if isinstance(structure, tuple):
        return tuple(_as_arrays(value) for value in structure)
    if structure is None or tf.is_tensor(structure):
        return structure
    return np.asarray(keras.ops.convert_to_numpy(structure) if hasattr(structure, "__array__") else structure)


class T5Gemma2Task(PresetMixin):
    """Base of the T5Gemma tasks (`T5Gemma2Seq2SeqLM`, the embedder, the classifiers).

    A task declares this base first and KerasHub's kind of task second
    (`Seq2SeqLM`, `TextClassifier`, or `Task` itself), which brings Keras'
    model. This base does not derive from `Task` itself: KerasHub rebuilds a
    task's functional class on every construction by walking its bases, and
    a second path to `Task` makes that walk fail ("a __bases__ item causes an
    inheritance cycle"). A subclass builds its functional model over
    `backbone` in `__init__` and sets `self.train_vision_tower` after
    `super().__init__`.

    - Text-only input to a vision model gets an empty `images` entry on
      every way in (`__call__` for direct calls, `call` for `fit` and
      `predict`).
    - `train_vision_tower` (default `False`): `fit` leaves the vision tower
      and the end-of-image embedding frozen, as T5Gemma 2 is fine-tuned.
    - `fit` shuffles in-memory samples every epoch; a dataset is read in its
      own order. Batches that are already model inputs (token-id dicts) skip
      the preprocessor.
    """

    # === Text-only input to a vision model ===

    def _with_default_images(self, inputs):
        return self.backbone.with_default_images(inputs)

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self._with_default_images(inputs), *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        return super().call(self._with_default_images(inputs), training=training, mask=mask)

    # === Quantization and export ===

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras `quantize`, by default over the float projections and embedding tables (`quantizable`)."""
        quantize_projections(super().quantize, mode, config=config, filters=filters, **kwargs)

    def gptq_quantize(self, calibration, batch_size=32, group_size=128, max_length=None):
        """4-bit weights calibrated with GPTQ on `calibration`, then `quantize("int4")` for the rest.

        The text transformer layers' projections (encoder, then decoder) are
        quantized by GPTQ (`models.quantization.gptq_quantize`: Keras' per-layer
        algorithm, driven through the whole model because Keras' own driver
        cannot run an encoder-decoder); the tied embedding table and the
        vision tower, which GPTQ does not cover (Keras' GPTQ quantizes `Dense`
        and `EinsumDense` only; the tower sees only images), then get plain
        int4 (`quantize("int4")`), as does any layer the calibration never
        reached. Not yet saved: a preset of a GPTQ model reloads without its
        GPTQ layers' values (Keras finds no variables for them); quantize again
        after loading the float preset.

        Args:
            calibration: samples as `predict` takes them: prompts (strings, or
                a dict with `"encoder_text"` and `"images"`); a seq2seq model
                is calibrated on its own greedy float answers to them (it is
                compiled with `sampler="greedy"` for that) unless the dict
                holds `"decoder_text"`. About a hundred
                prompts of the kind the model will see are enough.
            batch_size: samples per calibration forward pass.
            group_size: inputs per scale and zero point (Keras' `GPTQConfig`).
            max_length: the seq2seq answers' `max_length` (default: `generate`'s).

        Returns:
            The paths of the layers GPTQ calibrated.

        Example:
        ```python
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
        calibrated = seq_2_seq_lm.gptq_quantize(["reverse: 1 2 3", "sort: 3 1 2"] * 16)
        seq_2_seq_lm.generate("reverse: 4 5 6")
        ```
        """
        if isinstance(calibration, str):
            calibration = [calibration]
        if hasattr(self, "generate"):
            calibration = self._with_answers(calibration, batch_size, max_length)
        count = len(calibration["encoder_text"] if isinstance(calibration, dict) else calibration)
        if not count:
            raise ValueError("`gptq_quantize` needs at least one calibration sample.")
        batches = []
        for start in range(0, count, batch_size):
            part = _rows(calibration, slice(start, start + batch_size))
            features = self.preprocessor(part)
            features = features[0] if isinstance(features, tuple) else features
            batches.append(self._with_default_images(features))
        calibrated = gptq_quantize(self.backbone, batches, group_size=group_size)
        self.quantize("int4")  # what GPTQ left float: the table, the vision tower, the heads
        return calibrated

    def _with_answers(self, calibration, batch_size, max_length):
        """`calibration` as a dict with `"decoder_text"`: the float model's greedy answers unless given."""
        if not isinstance(calibration, dict):
            calibration = {"encoder_text": list(calibration)}
        if "decoder_text" in calibration:
            return calibration
        self.compile(sampler="greedy")
        answers = []
        count = len(calibration["encoder_text"])
        for start in range(0, count, batch_size):
            part = _rows(calibration, slice(start, start + batch_size))
            kwargs = {} if max_length is None else {"max_length": max_length}
            answers.extend(self.generate(part, **kwargs))
        return {**calibration, "decoder_text": answers}

    def export_to_transformers(self, path, dtype=None, max_shard_size="2GB", overwrite=False):
        """Writes a Hugging Face `transformers` folder of this task; see `t5gemma2_task.export_to_transformers`.

        Example:
        ```python
        import tempfile

        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
        folder = seq_2_seq_lm.export_to_transformers(tempfile.mkdtemp() + "/digits_hf")
        # transformers.T5Gemma2ForConditionalGeneration.from_pretrained(folder)
        ```
        """
        return export_to_transformers(self, path, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)

    # === The frozen vision tower ===

    @property
    def train_vision_tower(self):
        """bool: whether `fit` trains the vision tower (default `False`).

        T5Gemma 2 is fine-tuned with SigLIP frozen. Frozen weights are not
        trainable, so the optimizer never sees them: no optimizer state, no
        update and no weight decay, whose step would otherwise move every
        weight it is given, gradient or not. The end-of-image embedding, used
        only after an image, is frozen with the tower. A text-only backbone
        has nothing to freeze.

        `True` makes its weights trainable again, as the rest of the
        backbone's (set it before `backbone.enable_lora`, which then gives
        the tower's projections adapters like the text stacks'). `False`
        freezes them; `compile` freezes them again, so that `enable_lora`
        after this cannot undo it. Change it before `compile`.
        """
        return self._train_vision_tower

    @train_vision_tower.setter
    def train_vision_tower(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"`train_vision_tower` must be a bool; got {value!r}.")
        self._train_vision_tower = value
        backbone = self.backbone
        if backbone.vision_encoder is not None:
            for holder in (backbone.vision_encoder, backbone.token_embedding.eoi_embedding):
                holder.trainable = value

    def compile(self, *args, **kwargs):
        # KerasHub's `Task.__init__` compiles before the setting exists; frozen is the default.
        if not getattr(self, "_train_vision_tower", False):
            self.train_vision_tower = False
        super().compile(*args, **kwargs)

    # === Input pipelines ===

    def preprocess_samples(self, x, y=None, sample_weight=None):
        """KerasHub's preprocessing of one batch; batches of model inputs pass through as they are."""
        if is_model_input(x):
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        return super().preprocess_samples(x, y, sample_weight)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        shuffle=True,
        sample_weight=None,
        validation_split=None,
        validation_data=None,
        **kwargs,
    ):
        """Keras `fit`; `shuffle` shuffles in-memory samples each epoch (datasets are read in order).

        KerasHub batches in-memory samples before Keras sees them, so Keras'
        `shuffle` would never apply. Here the samples are shuffled before
        batching, every epoch, and a dataset, `PyDataset` or generator is read
        as given: shuffle it yourself (`dataset.shuffle(buffer_size)`).
        Preprocessing is mapped over the batches in parallel and prefetched.
        """
        if isinstance(x, (dict, tuple, list, np.ndarray)) or keras.ops.is_tensor(x):
            batch_size = batch_size or 32
            samples = _as_arrays(keras.utils.pack_x_y_sample_weight(x, y, sample_weight))
            if validation_split and validation_data is None:
                # As Keras does: the last fraction of the samples, before any shuffling.
                count = len(keras.tree.flatten(samples)[0])
                split = int(count * (1.0 - validation_split))
                held_out = keras.tree.map_structure(lambda leaf: leaf[split:], samples)
                validation_data = tf.data.Dataset.from_tensor_slices(held_out).batch(batch_size)
                samples = keras.tree.map_structure(lambda leaf: leaf[:split], samples)
            dataset = tf.data.Dataset.from_tensor_slices(samples)
            if shuffle:
                dataset = dataset.shuffle(dataset.cardinality(), reshuffle_each_iteration=True)
            x, y, sample_weight = dataset.batch(batch_size), None, None
            batch_size = validation_split = None
        return super().fit(
            x,
            y,
            batch_size=batch_size,
            shuffle=False,
            sample_weight=sample_weight,
            validation_split=validation_split,
            validation_data=validation_data,
            **kwargs,
        )

    def predict_samples(self, samples, batch_size=32):
        """The model's outputs for Python samples (strings, dicts with images), preprocessed in batches.

        The preprocessor runs eagerly on each batch of `batch_size` samples
        (images of any sizes are converted there), and the compiled model on
        its output; outputs are concatenated in order.
        """
        outputs = [
            keras.tree.map_structure(
                np.asarray, self.predict_on_batch(self.preprocessor(samples[start : start + batch_size]))
            )
            for start in range(0, len(samples), batch_size)
        ]
        return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outputs)
