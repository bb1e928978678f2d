"""Rotary position embeddings (RoPE) in the half-split layout."""

import numpy as np
from keras import ops


def rotary_cos_sin(positions, head_dim, wavelength, scaling_factor=1.0, dtype="float32"):
    """Cosine and sine tables for `positions`.

    Linear scaling divides the frequencies by `scaling_factor`, which is the
    same as dividing the positions. Angles are computed in float32 and rounded
    to `dtype` afterwards.

    Args:
        positions: int tensor `(T,)` or `(B, T)`.
        head_dim: int, even.
        wavelength: float, the RoPE base (theta).
        scaling_factor: float, linear position scaling.
        dtype: dtype of the returned tables.

    Returns:
        `(cos, sin)`, each `(..., T, head_dim)`.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inverse_frequencies = np.float32(1.0) / np.power(np.float32(wavelength), exponents, dtype=np.float32)
    inverse_frequencies = inverse_frequencies / np.float32(scaling_factor)
    angles = ops.cast(positions, "float32")[..., None] * ops.convert_to_tensor(inverse_frequencies)
    angles = ops.concatenate([angles, angles], axis=-1)
    return ops.cast(ops.cos(angles), dtype), ops.cast(ops.sin(angles), dtype)


def apply_rotary(x, cos, sin):
    """Rotates `x` of shape `(B, T, N, H)` by tables of shape `(T, H)` or `(B, T, H)`."""
    if len(cos.shape) == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    first, second = ops.split(x, 2, axis=-1)
    rotated = ops.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
