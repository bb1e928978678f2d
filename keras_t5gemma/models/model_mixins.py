"""Plumbing shared by backbones and tasks: default images, `quantize` and exports, each written once."""

import keras

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


class QuantizeProjectionsMixin:
    """`quantize` over the projections and embedding tables unless `filters` says otherwise."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras `quantize`, by default over the projections and the embedding table.

        `quantize("int8")` stores weights as int8 with per-channel scales;
        generation then reads a quarter of the float32 bytes per step.
        """
        super().quantize(mode, config=config, filters=filters or quantizable, **kwargs)


class TransformersExportMixin:
    """`export_to_transformers`, through the exporter that `keras_t5gemma.conversion` registers."""

    def export_to_transformers(self, path, dtype=None, max_shard_size="2GB", overwrite=False):
        """Writes a Hugging Face `transformers` folder of this model.

        The folder holds safetensors weights (LoRA merged; sharded with
        `model.safetensors.index.json` above `max_shard_size`), `config.json`
        and, for a task with a preprocessor, the tokenizer files and (vision
        models) `processor_config.json`. A backbone or a `T5Gemma2Seq2SeqLM`
        loads with `T5Gemma2ForConditionalGeneration.from_pretrained`, a
        `T5Gemma2Embedder` with `AutoModel.from_pretrained`
        (`T5Gemma2Encoder`).

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
