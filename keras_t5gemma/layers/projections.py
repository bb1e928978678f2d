"""Keras' projection layers, with a fast path for one row of int8 or 16-bit activations on the JAX CPU backend.

XLA's CPU compiler emits a product of a single row with a matrix (batch-1
decoding: `(1, D) x (D, N)`) as its own loop unless both operands are
float32; for int8 x int8 (Keras' `quantize("int8")`) and bfloat16 that loop
runs 10-30x slower than float32, while the same product with two rows goes
to the fast matrix-multiply library (at 270m, the int8 output projection:
about 300 ms with one row, 12 ms with two). So these layers give such a
product a second row, a copy of the first, behind an optimization barrier
(XLA would otherwise split the product back into single rows), and drop it
from the result. float32, other backends and accelerators run as Keras does.

The weights, their names and shapes, `quantize`, LoRA and saving are Keras'
own: these are subclasses that only wrap `call`.
"""

import math

import keras
import numpy as np
from keras import ops


def _single_row_is_slow(layer):
    """Whether `layer` runs one-row products through XLA CPU's slow loop (int8 or non-float32 weights)."""
    if keras.config.backend() != "jax":
        return False
    if layer.quantization_mode is None and layer.compute_dtype == "float32":
        return False
    import jax

    return jax.default_backend() == "cpu"


def _call_with_two_rows(call, inputs, *args, **kwargs):
    """`call(inputs)` for one row of `inputs` (axis 0 of size 1), computed on two copies of it."""
    import jax

    doubled = jax.lax.optimization_barrier(ops.concatenate([inputs, inputs], axis=0))
    outputs = call(doubled, *args, **kwargs)
    return outputs[:1]


def _rows(shape, kept_axes):
    """The static number of rows of `shape` (the product of `kept_axes`), or `None` when not static."""
    dims = [shape[axis] for axis in kept_axes]
    if any(not isinstance(dim, int) for dim in dims):
        return None
    return math.prod(dims)


class _TwoRowCall:
    """Wraps `call` and `quantized_call` so that a single row gets a second row where that is faster."""

    def _kept_axes(self, shape):
        """The input axes that are not contracted (their product is the number of rows)."""
        return range(len(shape) - 1)

    def _with_two_rows(self, call, inputs, *args, **kwargs):
        shape = getattr(inputs, "shape", None)
        if not shape or shape[0] != 1 or _rows(shape, self._kept_axes(shape)) != 1 or not _single_row_is_slow(self):
            return call(inputs, *args, **kwargs)
        return _call_with_two_rows(call, inputs, *args, **kwargs)

    def call(self, inputs, *args, **kwargs):
        if self.quantization_mode is None and _single_row_is_slow(self):
            return self._with_two_rows(self._float32_sums_call, inputs)
        return self._with_two_rows(super().call, inputs, *args, **kwargs)

    def _float32_sums_call(self, inputs):
        """Keras' `call` for 16-bit weights, with the products summed in float32.

        XLA CPU runs a 16-bit x 16-bit product with a 16-bit result ~20x
        slower than the same product with a float32 result.
        """
        kernel = ops.convert_to_tensor(self.kernel)
        outputs = ops.cast(self._float32_sums(inputs, kernel), self.compute_dtype)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras' `type_check` refuses subclasses; these compute as their base class does.
        super().quantize(mode, type_check=False, config=config)

    def quantized_build(self, kernel_shape, mode, config=None):
        super().quantized_build(kernel_shape, mode, config)
        if mode == "gptq" and not hasattr(self, "_kernel"):
            # Built from a saved GPTQ policy (a reload): no float kernel to calibrate, the values to
            # come are calibrated ones. Keras marks it calibrated only when they are read, after the
            # backbone's functional graph has already called it.
            self.is_gptq_calibrated = True

    def quantized_call(self, inputs, *args, **kwargs):
        return self._with_two_rows(super().quantized_call, inputs, *args, **kwargs)


class Dense(_TwoRowCall, keras.layers.Dense):
    """`keras.layers.Dense` with the fast one-row path (see the module docstring).

    Example:
    >>> Dense(3)(keras.ops.ones((1, 1, 4))).shape
    (1, 1, 3)
    """

    def _float32_sums(self, inputs, kernel):
        import jax

        return jax.numpy.matmul(inputs, kernel, preferred_element_type="float32")


class EinsumDense(_TwoRowCall, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with the fast one-row path (see the module docstring).

    The rows are the input axes that the equation keeps in its output.

    Example:
    >>> EinsumDense("btd,dnh->btnh", output_shape=(None, 2, 3))(keras.ops.ones((1, 1, 4))).shape
    (1, 1, 2, 3)
    """

    def _float32_sums(self, inputs, kernel):
        import jax

        return jax.numpy.einsum(self.equation, inputs, kernel, preferred_element_type="float32")

    def _kept_axes(self, shape):
        input_labels, rest = self.equation.split(",")
        output_labels = rest.split("->")[1]
        return [axis for axis, label in enumerate(input_labels) if label in output_labels]


class ReversibleEmbedding(_TwoRowCall, keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose tied output projection reads the table as stored.

    Keras computes `reverse=True` as `matmul(x, transpose(table))`; on the
    JAX CPU backend that transpose keeps XLA from its fast int8 and 16-bit
    kernels. For int8 and 16-bit tables there, the projection is
    `einsum("...d,vd->...v")` over the `(V, D)` table as it is stored (no
    second copy, the same variables, so checkpoints, presets, `quantize` and
    the layout map see no difference), with float32 sums and the fast
    one-row path of the module docstring. float32 keeps Keras' form, which
    XLA runs faster than the einsum.

    Example:
    >>> table = ReversibleEmbedding(10, 4)
    >>> table(table(keras.ops.array([[1]])), reverse=True).shape
    (1, 1, 10)
    """

    def _reads_table_as_stored(self, reverse):
        return reverse and self.tie_weights and self.reverse_dtype is None

    def call(self, inputs, reverse=False):
        if not reverse:
            return keras.layers.ReversibleEmbedding.call(self, inputs)
        if not self._reads_table_as_stored(reverse) or not _single_row_is_slow(self):
            # float32 (XLA's own matrix-vector loop is fast) and other backends: as Keras computes.
            return super().call(inputs, reverse=True)
        return self._with_two_rows(self._float_logits, inputs)

    def quantized_call(self, inputs, reverse=False):
        if not reverse:
            return keras.layers.ReversibleEmbedding.quantized_call(self, inputs)
        return super().quantized_call(inputs, reverse=True)

    def _int8_call(self, inputs, reverse=False):
        if not self._reads_table_as_stored(reverse):
            return super()._int8_call(inputs, reverse=reverse)
        # Keras' arithmetic (int8 activations with per-row scales, int32
        # sums, per-token scales of the table), without the transpose.
        if self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs)
        else:
            inputs_scale = ops.ones((1,), dtype=self.compute_dtype)
        logits = ops.einsum("...d,vd->...v", inputs, self._embeddings)
        logits = ops.divide(ops.cast(logits, self.compute_dtype), ops.multiply(inputs_scale, self.embeddings_scale))
        return self._soft_capped(logits)

    def _int4_build(self, embeddings_shape, config=None):
        # Keras gives an int4 table rebuilt from its dtype policy (no config: a reloaded preset)
        # int8 activations in the tied projection, while `quantize("int4")` (its default config)
        # keeps them float: a reloaded int4 model would not compute what was saved. Weight-only
        # unless the config asks otherwise, as Keras' int4 `Dense` and `EinsumDense` are.
        super()._int4_build(embeddings_shape, config)
        self.inputs_quantizer = None if config is None else config.activation_quantizer

    def _float_logits(self, inputs):
        import jax

        # float32 sums: XLA CPU's bfloat16-result kernels are ~20x slower than its bfloat16 x bfloat16 -> float32 ones.
        table = ops.convert_to_tensor(self.embeddings)
        logits = jax.numpy.einsum("...d,vd->...v", inputs, table, preferred_element_type="float32")
        return self._soft_capped(ops.cast(logits, self.compute_dtype))

    def _soft_capped(self, logits):
        if self.logit_soft_cap is None:
            return logits
        return ops.multiply(ops.tanh(ops.divide(logits, self.logit_soft_cap)), self.logit_soft_cap)


class FusedEinsumDense(EinsumDense):
    """An `EinsumDense` whose kernel holds several projections of one input, side by side along `part_axis`.

    One product in place of several (a decoding step's fixed cost is per
    product). `parts` names the layers it replaces, as earlier versions
    saved them (their attribute names): weights saved that way load into it,
    each part's variables placed along the part axis. `call_parts` computes
    some of the parts alone (the decoder's keys and values of the encoder
    output, without its queries).

    Args:
        equation, output_shape, ...: as `EinsumDense`.
        parts: tuple of str, the attribute names of the replaced layers, in
            their order along the part axis.
        part_axis: int, the kernel axis that holds the parts.
        part_sizes: optional tuple of int, each part's width along that axis
            (default: 1 each).

    Example:
    >>> layer = FusedEinsumDense("btd,dci->btci", (None, 2, 3), parts=("a", "b"))
    >>> layer(keras.ops.ones((1, 1, 4))).shape
    (1, 1, 2, 3)
    """

    def __init__(self, equation, output_shape, parts, part_axis=1, part_sizes=None, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self.parts = tuple(parts)
        self.part_axis = part_axis
        self.part_sizes = tuple(part_sizes) if part_sizes is not None else (1,) * len(self.parts)
        if len(self.part_sizes) != len(self.parts):
            raise ValueError(f"`part_sizes` {self.part_sizes} must give one width per part of {self.parts}.")

    def part_span(self, first, last=None):
        """`(start, stop)` along the part axis of parts `first` to `last` (inclusive; default `first`)."""
        last = first if last is None else last
        return sum(self.part_sizes[:first]), sum(self.part_sizes[: last + 1])

    def call_parts(self, inputs, first, last=None):
        """The outputs of parts `first` to `last` (inclusive) alone.

        Unquantized, only the kernel's slice of those parts is multiplied
        (LoRA included, through `kernel`); a quantized kernel (its scales laid
        out per mode) computes all the parts, and their slice is returned.
        """
        start, stop = self.part_span(first, last)
        kernel_labels, output_labels = self.equation.split(",")[1].split("->")
        output_axis = output_labels.index(kernel_labels[self.part_axis])
        if self.quantization_mode is not None:
            outputs = self(inputs)
            return outputs[(slice(None),) * output_axis + (slice(start, stop),)]
        kernel = ops.cast(self.kernel, self.compute_dtype)[(slice(None),) * self.part_axis + (slice(start, stop),)]
        inputs = ops.cast(inputs, self.compute_dtype)
        if _single_row_is_slow(self):  # 16-bit weights on XLA CPU: float32 sums (see `_float32_sums_call`)
            outputs = ops.cast(self._float32_sums(inputs, kernel), self.compute_dtype)
        else:
            outputs = ops.einsum(self.equation, inputs, kernel)
        if self.bias is not None:
            bias_axis = self.bias_axes.index(kernel_labels[self.part_axis])
            bias = ops.cast(self.bias, self.compute_dtype)
            outputs = ops.add(outputs, bias[(slice(None),) * bias_axis + (slice(start, stop),)])
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def load_own_variables(self, store):
        if self.built and len(store.keys()) == 0:
            saved_apart = self._parts_saved_apart(store)
            if saved_apart is not None:
                store = saved_apart
        super().load_own_variables(store)

    def _parts_saved_apart(self, store):
        """`{"0": kernel, ...}` put together from the replaced layers' saved variables; `None` if absent."""
        # Keras' weights stores (`.h5`, sharded `.h5`) name the entry being read `_h5_entry_path`.
        path = getattr(store, "_h5_entry_path", None)
        if path is None or not hasattr(store, "get"):
            return None
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        saved = []
        for part in self.parts:
            store.get(f"{parent}/{part}" if parent else part)
            saved.append([np.asarray(store[key]) for key in sorted(store.keys(), key=int)])
        if not all(saved):
            return None
        if self.quantization_mode not in (None, "int8"):
            raise ValueError(
                f"`{self.path}` was saved as {len(self.parts)} separate layers {self.parts}, which load into "
                f"its fused kernel in float or int8, not {self.quantization_mode}: load that model unquantized "
                "and quantize it after."
            )
        # In the order Keras saves them (`save_own_variables`), which is not that of `weights`.
        names = [
            name
            for name in self.variable_serialization_spec[self.quantization_mode]
            if name != "bias" or self.bias is not None
        ]
        variables = [self._kernel if name == "kernel" else getattr(self, name) for name in names]
        if any(len(values) != len(variables) for values in saved):
            return None
        return {
            str(i): self._placed_side_by_side(variable, [values[i] for values in saved])
            for i, variable in enumerate(variables)
        }

    def _placed_side_by_side(self, variable, values):
        shape = tuple(variable.shape)
        # The kernel's parts lie along `part_axis`; a bias's or a scale's along its first axis as wide as them all.
        axis = self.part_axis if variable.name == "kernel" else shape.index(sum(self.part_sizes))
        part_shape = (*shape[:axis], -1, *shape[axis + 1 :])
        return np.concatenate([np.reshape(value, part_shape) for value in values], axis=axis)

    def get_config(self):
        config = {**super().get_config(), "parts": self.parts, "part_axis": self.part_axis}
        if any(size != 1 for size in self.part_sizes):
            config["part_sizes"] = self.part_sizes
        return config
