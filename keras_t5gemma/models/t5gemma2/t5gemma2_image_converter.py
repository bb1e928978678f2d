"""T5Gemma 2 image converter: Gemma 3's image preprocessing, reproduced exactly.

The reference (`transformers`' PIL Gemma 3 image processor) resizes uint8 RGB
images with Pillow's bilinear filter, then rescales and normalises them. Pillow's
filter is not the textbook one, so it is rebuilt here from its definition:

- The triangle filter is stretched by the shrink factor when downscaling, so
  every input pixel contributes (antialiasing); upscaling uses the plain
  triangle.
- Each axis is a banded matrix whose rows are normalised to sum to one and then
  quantised to 22-bit fixed point.
- One axis is resampled and rounded back to uint8, then the other; which goes
  first depends on the sizes (see `resize_like_pillow`).

The passes run in NumPy with exact integer arithmetic. Inside `tf.data` the same
NumPy code runs through `tf.numpy_function`.
"""

import math

import keras
import numpy as np
from keras_hub.layers import ImageConverter

from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.utils.keras_hub_compat import in_grain_data_pipeline
from keras_t5gemma.utils.keras_hub_compat import in_tf_function
from keras_t5gemma.utils.preset_utils import PresetMixin

# Pillow's fixed point for 8-bit images: 32 bits less 8 for the pixel, 2 for overflow.
_PRECISION_BITS = 22
# `ImageConverter` arguments that this converter fixes to match the reference,
# with the values it fixes them to: KerasHub's configs carry them, and they
# are accepted when they say the same.
_FIXED_RESIZING_ARGUMENTS = {
    "interpolation": "bilinear",
    "antialias": True,
    "crop_to_aspect_ratio": False,
    "pad_to_aspect_ratio": False,
    "bounding_box_format": "yxyx",
    "data_format": "channels_last",
}


def pillow_bilinear_weights(input_size, output_size):
    """Pillow's bilinear resampling along one axis, as a banded matrix.

    Output pixel `i` is `sum_t weights[i, t] * input[first[i] + t]`; weights
    past the end of the input are zero.

    Args:
        input_size: int, pixels along the axis before resizing.
        output_size: int, pixels along the axis after resizing.

    Returns:
        `(first, weights)`: int64 `(output_size,)` and float64
        `(output_size, taps)`, each row summing to one.
    """
    scale = input_size / output_size
    # Shrinking widens the triangle so that it covers `scale` input pixels per side.
    stretch = max(scale, 1.0)
    support = stretch
    taps = 2 * math.ceil(support) + 1
    centers = (np.arange(output_size) + 0.5) * scale
    # Pillow rounds the window ends with C's truncating cast, then clamps them.
    first = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(centers + support + 0.5), input_size).astype(np.int64)
    positions = first[:, None] + np.arange(taps)
    distance = (positions - centers[:, None] + 0.5) * (1.0 / stretch)
    weights = np.maximum(1.0 - np.abs(distance), 0.0)
    weights = np.where(positions < stop[:, None], weights, 0.0)
    # A running sum in tap order, as Pillow adds them: the last bit can matter
    # once the weights are quantised.
    total = np.zeros(output_size)
    for tap in range(taps):
        total += weights[:, tap]
    return first, weights / total[:, None]


def _resample_axis(pixels, axis, output_size, round_to_uint8):
    """Resamples `pixels` (`(..., H, W, C)`) along `axis` (-3 or -2)."""
    input_size = pixels.shape[axis]
    first, weights = pillow_bilinear_weights(input_size, output_size)
    shape = _resized_shape(pixels.shape, axis, output_size)
    if round_to_uint8:
        # Pillow's int32 arithmetic: the sums stay below 255 * 2**22 plus rounding.
        weights = np.trunc(weights * (1 << _PRECISION_BITS) + 0.5).astype(np.int32)
        pixels = pixels.astype(np.int32)
        total = np.full(shape, 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    else:
        pixels = pixels.astype(np.float64)
        total = np.zeros(shape)
    # Weights index the output along `axis`; broadcast them over the axes after it.
    trailing = (1,) * (-axis - 1)
    for tap in range(weights.shape[1]):
        term = np.take(pixels, np.minimum(first + tap, input_size - 1), axis=axis)
        term *= weights[:, tap].reshape((-1,) + trailing)
        total += term
    if round_to_uint8:
        return np.clip(total >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return total


def _resized_shape(shape, axis, size):
    shape = list(shape)
    shape[axis] = size
    return tuple(shape)


def resize_like_pillow(images, image_size):
    """Resizes `(..., H, W, 3)` images as Pillow's bilinear `Image.resize` does.

    uint8 images give exactly Pillow's uint8 result. Float images (pixel values
    in [0, 255]) use the same filter in float64 without the fixed-point weights
    or the rounding after each pass.

    Args:
        images: uint8 or float array `(..., H, W, C)`.
        image_size: `(height, width)` of the output.

    Returns:
        uint8 array for uint8 input, else float64; shape `(..., height, width, C)`.
    """
    exact = images.dtype == np.uint8
    height, width = image_size
    passes = [(-2, width), (-3, height)]
    # Pillow 13 resamples height first when it shrinks more than twice as many
    # pixels as width does (earlier Pillows always start with width). With
    # uint8 rounding between the passes, the order changes results.
    shrink_height, shrink_width = images.shape[-3] - height, images.shape[-2] - width
    if shrink_height > 0 and shrink_height > 2 * shrink_width:
        passes.reverse()
    for axis, size in passes:
        # Pillow skips an axis whose size does not change.
        if images.shape[axis] != size:
            images = _resample_axis(images, axis, size, exact)
    return images


# Pillow's integer modes wider than 8 bits (16-bit PNG/TIFF grey levels), by the largest value they hold.
_WIDE_INTEGER_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def _wide_to_grey(image):
    """uint8 grey levels of a 16-bit, 32-bit integer or float PIL image, scaled from the mode's range.

    Pillow's own `convert("RGB")` clips these values at 255 (a dark 16-bit
    image turns white). Here 16-bit modes are scaled from [0, 65535]; mode
    `I` (32-bit integers, which is also how Pillow holds some 16-bit files)
    from [0, 65535] when every value lies there, else from [0, 2**31 - 1];
    mode `F` (32-bit floats) from [0, 1]. Values outside the range (negative
    integers, floats beyond [0, 1] or NaN) have no colour meaning to guess:
    they are refused.
    """
    values = np.asarray(image)
    if image.mode == "F":
        if not np.all((values >= 0.0) & (values <= 1.0)):
            raise ValueError(
                "A 32-bit float image (PIL mode `F`) must hold values in [0, 1]; this one holds "
                f"[{np.nanmin(values):g}, {np.nanmax(values):g}]{' and NaN' if np.isnan(values).any() else ''}. "
                "Scale it to [0, 1] (or convert it to 8 bits) first."
            )
        top = 1.0
    else:
        values = values.astype("int64")
        if values.size and values.min() < 0:
            raise ValueError(
                f"A 32-bit integer image (PIL mode `{image.mode}`) holds negative values ({values.min()}), which have "
                "no colour meaning; convert it to 8 bits first."
            )
        top = _WIDE_INTEGER_MODES.get(image.mode) or (65535 if not values.size or values.max() <= 65535 else 2**31 - 1)
    grey = np.rint(values.astype("float64") * (255.0 / top)).astype("uint8")
    transparency = image.info.get("transparency")
    if isinstance(transparency, (int, float)):
        # A single transparent grey level (PNG tRNS): composited onto white, as for other modes.
        grey[np.asarray(image) == transparency] = 255
    return grey


def pil_image_to_rgb(image):
    """RGB uint8 pixels `(H, W, 3)` of a PIL image; transparency is composited onto white, like the reference.

    The one conversion for images from files and from the Python API alike,
    for every mode Pillow opens: 16-bit and 32-bit integer and float grey
    images are scaled from their range (see `_wide_to_grey`), not clipped;
    premultiplied-alpha modes (`La`, `RGBa`) are unpremultiplied first.
    """
    from PIL import Image

    if image.mode in _WIDE_INTEGER_MODES or image.mode in ("I", "F"):
        return np.repeat(_wide_to_grey(image)[..., None], 3, axis=-1)
    if image.mode == "La":
        # Pillow converts `La` to nothing else; its grey level is premultiplied by alpha.
        grey, alpha = (np.asarray(band, "float64") for band in image.split())
        unpremultiplied = np.where(alpha > 0, np.clip(np.rint(grey * 255.0 / np.maximum(alpha, 1)), 0, 255), 0)
        image = Image.merge("LA", [Image.fromarray(unpremultiplied.astype("uint8")), image.getchannel("a")])
    elif image.mode == "RGBa":
        image = image.convert("RGBA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))


def _is_pil_image(value):
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(value, Image.Image)


def _check_shape(shape, ranks, what):
    """Checks rank, channels and size of a shape whose unknown sides are `None`."""
    if len(shape) not in ranks:
        expected = " or ".join(
            {3: "3 `(height, width, 3)`", 4: "4 `(batch, height, width, 3)`"}[rank] for rank in ranks
        )
        raise ValueError(f"{what} must have rank {expected}; got shape {tuple(shape)}.")
    if shape[-1] is not None and shape[-1] != 3:
        raise ValueError(
            f"{what} must be channels-last RGB with 3 channels; got shape {tuple(shape)} "
            f"({shape[-1]} channels). Convert other arrays to RGB first, or pass PIL "
            "images, which are converted to RGB."
        )
    if any(side is not None and side < 1 for side in shape[-3:-1]):
        raise ValueError(f"{what} must have a positive height and width; got shape {tuple(shape)}.")


def _check_pixels(pixels, ranks, what):
    """Checks shape and dtype; returns uint8 or float pixels."""
    _check_shape(pixels.shape, ranks, what)
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.all(np.isfinite(pixels)):
            bad = int(np.size(pixels) - np.count_nonzero(np.isfinite(pixels)))
            raise ValueError(f"{what} hold {bad} NaN or infinite pixel value(s); pixels must be finite.")
        return pixels
    if np.issubdtype(pixels.dtype, np.integer):
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise ValueError(
                f"Integer {what.lower()} must hold values in [0, 255]; got values in [{pixels.min()}, {pixels.max()}]."
            )
        return pixels.astype(np.uint8)
    raise ValueError(f"{what} must be uint8, integer or float; got dtype {pixels.dtype}.")


def _to_numpy(value):
    if keras.ops.is_tensor(value):
        return keras.ops.convert_to_numpy(value)
    return np.asarray(value)


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2ImageConverter(PresetMixin, ImageConverter):
    """Turns raw RGB images into T5Gemma 2 vision inputs.

    Matches the reference Gemma 3 image processor (PIL backend) to float32
    rounding: images are converted to RGB, resized to `image_size` with
    Pillow's antialiased bilinear filter (aspect ratio not kept), then mapped
    to `pixel * scale + offset`. With the released settings (`scale = 1/127.5`,
    `offset = -1`) that is `(pixel / 255 - 0.5) / 0.5`, in [-1, 1].

    Inputs can be:
    - a uint8 (or integer, values in [0, 255]) array `(H, W, 3)` or
      `(B, H, W, 3)`, channels last;
    - a float array of the same shapes holding pixel values in [0, 255]
      (KerasHub's convention, not [0, 1]). Floats are resized with the same
      filter weights but without Pillow's fixed point and uint8 rounding, so
      integer-valued floats land within one uint8 level of the uint8 result;
    - a PIL image of any mode (transparent pixels are composited onto white,
      as the reference does);
    - a list or tuple of the above single images, of any sizes: a batch, each
      image resized on its own and then stacked.

    Inside `tf.data` (`dataset.map(converter)`) it takes uint8 or float
    tensors of rank 3 or 4 and gives the same values.

    Outputs: float32 `(height, width, 3)` for a single image,
    `(B, height, width, 3)` for a batch: the reference's `pixel_values`
    transposed to channels last.

    Args:
        image_size: `(height, width)` of the output, or `None` to keep the
            input size. Defaults to the released `(896, 896)`.
        scale: float or 3 per-channel floats multiplying the pixels
            (`rescale_factor / image_std` of a Hugging Face config), or `None`.
        offset: float or 3 per-channel floats added after scaling
            (`-image_mean / image_std`), or `None`.

    Example:
    ```python
    import numpy as np

    converter = T5Gemma2ImageConverter(image_size=(28, 28))
    images = np.random.randint(0, 256, size=(2, 40, 60, 3), dtype="uint8")
    converter(images).shape  # (2, 28, 28, 3)
    converter([images[0], images[1, :30]]).shape  # (2, 28, 28, 3)
    ```
    """

    backbone_cls = T5Gemma2Backbone

    def __init__(self, image_size=(896, 896), scale=1.0 / 127.5, offset=-1.0, **kwargs):
        fixed = [name for name, value in _FIXED_RESIZING_ARGUMENTS.items() if kwargs.pop(name, value) != value]
        if fixed:
            raise ValueError(
                f"T5Gemma2ImageConverter does not take other values of {fixed}: it always stretches the whole "
                "image to `image_size` with Pillow's antialiased bilinear filter, channels last, "
                "as the reference does."
            )
        if image_size is not None:
            if len(image_size) != 2 or any(int(side) != side or side < 1 for side in image_size):
                raise ValueError(f"`image_size` must be two positive ints or None; got {image_size}.")
            image_size = (int(image_size[0]), int(image_size[1]))
        for name, value in (("scale", scale), ("offset", offset)):
            if value is not None and np.ndim(value) == 1 and len(value) != 3:
                raise ValueError(f"`{name}` must be a float or 3 per-channel floats; got {value}.")
        # Pixel values are float32 whatever the model's policy, as in the reference.
        kwargs.pop("dtype", None)
        super().__init__(
            image_size=image_size,
            scale=scale,
            offset=offset,
            crop_to_aspect_ratio=False,
            interpolation="bilinear",
            antialias=True,
            data_format="channels_last",
            dtype="float32",
            **kwargs,
        )

    def call(self, inputs):
        if in_tf_function():
            return self._call_in_graph(inputs)
        outputs = self._convert_python(inputs)
        if in_grain_data_pipeline():
            return outputs
        return keras.ops.convert_to_tensor(outputs, dtype="float32")

    def _convert_python(self, inputs):
        if isinstance(inputs, (list, tuple)):
            images = [self._single_image(image) for image in inputs]
            if self.image_size is None and len({image.shape for image in images}) > 1:
                raise ValueError(
                    "Images of different sizes can only be batched with an `image_size`; got "
                    f"shapes {[image.shape for image in images]}."
                )
            return np.stack([self._convert_pixels(image) for image in images])
        if _is_pil_image(inputs):
            return self._convert_pixels(pil_image_to_rgb(inputs))
        return self._convert_pixels(_check_pixels(_to_numpy(inputs), (3, 4), "Images"))

    def _single_image(self, image):
        if _is_pil_image(image):
            return pil_image_to_rgb(image)
        return _check_pixels(_to_numpy(image), (3,), "Each image in a list")

    def _convert_pixels(self, pixels):
        """Resizes, scales and offsets checked `(..., H, W, 3)` pixels; float32 out."""
        if self.image_size is not None:
            pixels = resize_like_pillow(pixels, self.image_size)
        pixels = pixels.astype(np.float64)
        if self.scale is not None:
            pixels = pixels * np.asarray(self.scale, dtype=np.float64)
        if self.offset is not None:
            pixels = pixels + np.asarray(self.offset, dtype=np.float64)
        return pixels.astype(np.float32)

    def _convert_array(self, pixels):
        return self._convert_pixels(_check_pixels(pixels, (3, 4), "Images"))

    def _call_in_graph(self, images):
        import tensorflow as tf

        if isinstance(images, tf.RaggedTensor):
            raise ValueError(
                "T5Gemma2ImageConverter takes dense image tensors in tf.data; map it over single "
                "images before batching images of different sizes."
            )
        images = tf.convert_to_tensor(images)
        shape = images.shape
        if shape.rank is not None:
            _check_shape(shape.as_list(), (3, 4), "Images")
        outputs = tf.numpy_function(self._convert_array, [images], tf.float32, stateful=False)
        if shape.rank is not None:
            size = list(self.image_size) if self.image_size is not None else shape[-3:-1].as_list()
            outputs.set_shape(shape[:-3].as_list() + size + [3])
        return outputs

    def get_config(self):
        config = super().get_config()
        for name in (*_FIXED_RESIZING_ARGUMENTS, "dtype"):
            config.pop(name, None)
        return config
