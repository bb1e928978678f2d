"""Quantization of a model, in one place: which layers convert, and Keras' `quantize` run over them.

Backbones and tasks call `quantize_projections` from their `quantize`; the
quantize-on-load path (`conversion/quantized_loading.py`) builds the same
layers quantized (`quantizable`), and `from_preset(..., quantize=...)` ends
with `model.quantize(mode)`, which converts only what the load left float.
"""

import contextlib
import gc

import keras


def quantizable(layer):
    """Layers `quantize` converts by default: float projections and embedding tables.

    Norms, the preprocessor's layers and our composite layers are left alone
    (and Keras does not warn about them); so is a layer already quantized,
    which makes `quantize` convert only what is left float.
    """
    return (
        isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding))
        and layer.quantization_mode is None
    )


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


def quantize_projections(keras_quantize, mode=None, config=None, filters=None, **kwargs):
    """Runs a model's Keras `quantize` (`keras_quantize`, bound) over the projections and tables.

    `filters` defaults to `quantizable`. `quantize("int8")` stores weights as
    int8 with per-channel scales; generation then reads a quarter of the
    float32 bytes per step.
    """
    with collections_of_new_objects_only():
        keras_quantize(mode, config=config, filters=filters or quantizable, **kwargs)
    gc.collect()  # what the skipped collections left (about 0.5 GiB at 270m-270m)
