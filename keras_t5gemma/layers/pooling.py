"""One vector per sample from a sequence of hidden states."""

import keras
from keras import ops

POOLING_MODES = ("mean", "first", "last")
# The floor of the norm in L2 normalisation, as `torch.nn.functional.normalize`.
NORM_EPSILON = 1e-12


def l2_normalize(x):
    """`x / max(||x||, 1e-12)` along the last axis."""
    return ops.normalize(x, axis=-1, order=2, epsilon=NORM_EPSILON)


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class SequencePooling(keras.layers.Layer):
    """Pools `(B, S, D)` hidden states to `(B, D)`, optionally L2-normalised.

    Always computes (and returns) float32, whatever the input dtype, so that
    embeddings of a bfloat16 model can be compared with a float32 one.

    Args:
        mode: `"mean"` (mean over the real tokens), `"first"` (position 0)
            or `"last"` (the last real token; left or right padding).
        normalize: bool, divide each vector by its L2 norm.

    Call arguments:
        hidden: float `(B, S, D)`.
        padding_mask: int/bool `(B, S)`, 1 for real tokens; `None` means
            every position is real.

    Example:
    >>> pooling = SequencePooling("mean")
    >>> hidden = keras.ops.ones((2, 5, 8))
    >>> pooling(hidden, keras.ops.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])).shape
    (2, 8)
    """

    def __init__(self, mode="mean", normalize=False, **kwargs):
        if mode not in POOLING_MODES:
            raise ValueError(f"`mode` must be one of {POOLING_MODES}; got {mode!r}.")
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.mode = mode
        self.normalize = normalize

    def call(self, hidden, padding_mask=None):
        hidden = ops.cast(hidden, "float32")
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(hidden)[:2], "int32")
        mask = ops.cast(padding_mask, "int32")
        if self.mode == "mean":
            weights = ops.cast(mask, "float32")[..., None]
            count = ops.maximum(ops.sum(weights, axis=1), 1.0)
            pooled = ops.sum(hidden * weights, axis=1) / count
        elif self.mode == "first":
            pooled = hidden[:, 0, :]
        else:
            # The largest position holding a real token.
            positions = ops.arange(ops.shape(mask)[1], dtype="int32")[None, :]
            last = ops.argmax(positions * mask, axis=1)
            pooled = ops.take_along_axis(hidden, ops.cast(last, "int32")[:, None, None], axis=1)[:, 0, :]
        return l2_normalize(pooled) if self.normalize else pooled

    def compute_output_shape(self, hidden_shape, padding_mask_shape=None):
        return (hidden_shape[0], hidden_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return {**config, "mode": self.mode, "normalize": self.normalize}
