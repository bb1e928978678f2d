"""Plumbing shared by backbones and tasks: default images and `quantize`, each written once."""

import keras


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
