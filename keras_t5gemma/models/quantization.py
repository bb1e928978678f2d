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


def gptq_quantize(backbone, batches, weight_bits=4, group_size=128, hessian_damping=0.01):
    """GPTQ-calibrates the backbone's text transformer layers on `batches`, one layer at a time.

    Keras' own driver (`model.quantize("gptq", config=GPTQConfig(...))`)
    cannot run this encoder-decoder: it cuts its calibration data into
    windows of one token stream (`get_dataloader`) and passes a single
    tensor from block to block (`block(x)[0]`), so a decoder layer never gets
    its encoder output, its masks or positions, and a (prompt, answer) pair
    is not kept together. Here every block is calibrated by running the whole
    backbone on the real batches (masks, images and the decoder's inputs
    included), with the inputs of the block's projections captured on the
    way; Keras' per-layer GPTQ (`keras.src.quantizers.gptq.GPTQ`: the
    Hessian of those inputs, then the error-correcting quantization into the
    layer's "gptq" variables) does the rest. Blocks go in the order they run
    (encoder, then decoder), so each is calibrated on the outputs of the
    blocks already quantized before it, as in Keras' driver.

    Args:
        backbone: the backbone to quantize in place.
        batches: list of the backbone's input dicts (token ids, masks, images).
        weight_bits: 4 (or 2, 3, 8), Keras' `GPTQConfig.weight_bits`.
        group_size: inputs per scale and zero point (`-1`: one per column).
        hessian_damping: the fraction of the Hessian's mean diagonal added
            to it before inversion.

    Returns:
        The paths of the layers calibrated (everything else stays as it was).
    """
    from keras.src.quantizers.gptq import GPTQ  # Keras' per-layer GPTQ has no public name

    config = keras.quantizers.GPTQConfig(
        None, None, weight_bits=weight_bits, group_size=group_size, hessian_damping=hessian_damping
    )
    stacks = [stack for stack in (backbone.encoder, backbone.decoder) if stack is not None]
    blocks = [layer for stack in stacks for layer in stack.transformer_layers]
    calibrated = []
    for block in blocks:
        layers = [
            layer
            for layer in block._flatten_layers()
            if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and quantizable(layer)
        ]
        solvers = {id(layer): GPTQ(layer, config) for layer in layers}
        originals = {}
        for layer in layers:
            originals[id(layer)] = layer.call
            layer.call = _capturing(layer.call, solvers[id(layer)])
        try:
            for batch in batches:
                backbone(batch)
        finally:
            for layer in layers:
                layer.call = originals[id(layer)]
        for layer in layers:
            solver = solvers.pop(id(layer))
            if not solver.num_samples:
                continue  # not reached by the calibration batches (left to a plain `quantize`)
            layer.quantize("gptq", config=config)
            solver.quantize_and_correct_layer()
            solver.free()
            calibrated.append(layer.path)
    return calibrated


def _capturing(call, solver):
    """`call`, adding each input's rows to `solver`'s Hessian first."""

    def capturing_call(inputs, *args, **kwargs):
        solver.update_hessian_with_batch(keras.ops.reshape(inputs, (-1, int(solver.rows))))
        return call(inputs, *args, **kwargs)

    return capturing_call
