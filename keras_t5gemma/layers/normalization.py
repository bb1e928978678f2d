"""Gemma-style RMS normalization."""

import keras
from keras import ops


class RMSNormalization(keras.layers.Layer):
    """RMS normalization that multiplies by `(1 + scale)`, computed in float32.

    The scale starts at zero, so a fresh layer is a plain RMS normalization.
    The result is rounded to the compute dtype only after the scale is applied,
    as the reference does, which matters for bfloat16.

    Args:
        epsilon: float. Added to the mean square before the square root.

    Example:
    >>> norm = RMSNormalization()
    >>> norm(keras.ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(mean_square + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
