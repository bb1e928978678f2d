"""Plumbing shared by backbones and tasks, each written once: default images, `quantize`, exports,
the frozen vision tower and `fit`'s shuffling."""

import contextlib
import gc

import keras
import numpy as np

from keras_t5gemma.utils.keras_hub_compat import tf
from keras_t5gemma.utils.preset_utils import get_exporter


def quantizable(layer):
    """Layers `quantize` converts by default: projections and embedding tables.

    Norms, the preprocessor's layers and our composite layers are left alone
    (and Keras does not warn about them).
    """
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding))


class DefaultImagesMixin:
    """Text-only input to a vision model gets an empty `images` entry, on every way in.

    `__call__` covers direct calls; `call` covers `fit` and `predict`, which
    reach the model through `stateless_call`. The images come from the
    backbone's `with_default_images` (the model's own for a backbone, its
    `backbone`'s for a task).
    """

    def _with_default_images(self, inputs):
        return getattr(self, "backbone", self).with_default_images(inputs)

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self._with_default_images(inputs), *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        return super().call(self._with_default_images(inputs), training=training, mask=mask)


@contextlib.contextmanager
def collections_of_new_objects_only():
    """Garbage collections inside skip the objects that existed on entry (`gc.freeze`).

    Keras' `quantize` runs a full collection for each layer it converts (to
    release the float kernel at once); over all the objects of a process
    with a model loaded, each takes about a second (270m-270m: 178 s of
    collections against 19 s with this; the peak was 4.47 GiB against 4.07,
    one run each).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class QuantizeProjectionsMixin:
    """`quantize` over the projections and embedding tables unless `filters` says otherwise."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras `quantize`, by default over the projections and the embedding table.

        `quantize("int8")` stores weights as int8 with per-channel scales;
        generation then reads a quarter of the float32 bytes per step.
        """
        with collections_of_new_objects_only():
            super().quantize(mode, config=config, filters=filters or quantizable, **kwargs)
        gc.collect()  # what the skipped collections left (about 0.5 GiB at 270m-270m)


class TransformersExportMixin:
    """`export_to_transformers`, through the exporter the `conversion` package registers."""

    def export_to_transformers(self, path, dtype=None, max_shard_size="2GB", overwrite=False):
        """Writes a Hugging Face `transformers` folder of this model.

        The folder holds safetensors weights (LoRA merged; sharded with
        `model.safetensors.index.json` above `max_shard_size`), `config.json`
        and, for a task with a preprocessor, the tokenizer files and (vision
        models) `processor_config.json`. A backbone or a `T5Gemma2Seq2SeqLM`
        loads with `T5Gemma2ForConditionalGeneration.from_pretrained`, a
        `T5Gemma2Embedder` with `AutoModel.from_pretrained`
        (`T5Gemma2Encoder`), a `T5Gemma2TextClassifier` /
        `T5Gemma2TokenClassifier` with `T5Gemma2ForSequenceClassification` /
        `T5Gemma2ForTokenClassification` (the head as `score.out_proj`,
        `labels` as `id2label`).

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

        Example:
        ```python
        import tempfile

        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
        folder = seq_2_seq_lm.export_to_transformers(tempfile.mkdtemp() + "/digits_hf")
        # transformers.T5Gemma2ForConditionalGeneration.from_pretrained(folder)
        ```
        """
        return get_exporter("transformers")(self, path, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)


class VisionTowerTrainingMixin:
    """`train_vision_tower`: fine-tuning leaves the vision tower as it is unless asked.

    T5Gemma 2 is fine-tuned with SigLIP frozen. Frozen weights are not
    trainable, so the optimizer never sees them: no optimizer state, no update
    and no weight decay, whose step would otherwise move every weight it is
    given, gradient or not. The end-of-image embedding, used only after an
    image, is frozen with the tower.

    A text-only backbone has nothing to freeze, and the setting is a no-op.
    """

    def _vision_weights_holders(self):
        """The vision tower and the end-of-image embedding, or `()` for a text-only backbone."""
        backbone = self.backbone
        if backbone.vision_encoder is None:
            return ()
        return backbone.vision_encoder, backbone.token_embedding.eoi_embedding

    @property
    def train_vision_tower(self):
        """bool: whether `fit` trains the vision tower (default `False`).

        `True` makes its weights trainable again, as the rest of the backbone's
        (set it before `backbone.enable_lora`, which then gives the tower's
        projections adapters like the text stacks'). `False` freezes them;
        `compile` freezes them again, so that `enable_lora` after this cannot
        undo it. Change it before `compile`.
        """
        return self._train_vision_tower

    @train_vision_tower.setter
    def train_vision_tower(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"`train_vision_tower` must be a bool; got {value!r}.")
        self._train_vision_tower = value
        for holder in self._vision_weights_holders():
            holder.trainable = value

    def compile(self, *args, **kwargs):
        # KerasHub's `Task.__init__` compiles before the setting exists; frozen is the default.
        if not getattr(self, "_train_vision_tower", False):
            self.train_vision_tower = False
        super().compile(*args, **kwargs)


def _as_arrays(structure):
    """Dicts and tuples of samples with each leaf as one array (lists of strings included)."""
    if isinstance(structure, dict):
        return {key: _as_arrays(value) for key, value in structure.items()}
    if isinstance(structure, tuple):
        return tuple(_as_arrays(value) for value in structure)
    if structure is None or tf.is_tensor(structure):
        return structure
    return np.asarray(keras.ops.convert_to_numpy(structure) if hasattr(structure, "__array__") else structure)


class ShuffledFitMixin:
    """`fit` shuffles in-memory samples every epoch; a dataset is read in its own order.

    KerasHub batches in-memory samples into a `tf.data.Dataset` before Keras
    sees them, so Keras' `shuffle` never applied (and warned on every call).
    Here the samples are shuffled before batching, every epoch, and a
    dataset, `PyDataset` or generator is read as given: shuffle it yourself
    (`dataset.shuffle(buffer_size)`). Preprocessing is mapped over the
    batches in parallel and prefetched, as KerasHub does.
    """

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
        """Keras `fit`; `shuffle` shuffles in-memory samples each epoch (datasets are read in order)."""
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
