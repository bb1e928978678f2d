"""Hugging Face Gemma 3 `preprocessor_config.json` to `T5Gemma2ImageConverter` arguments.

T5Gemma 2 checkpoints use the Gemma 3 image processor. Its `rescale_factor`,
`image_mean` and `image_std` become the converter's per-channel
`scale = rescale_factor / std` and `offset = -mean / std`, so that
`pixel * scale + offset == (pixel * rescale_factor - mean) / std`.
"""

# Defaults of the reference processor class, used when a field is absent or null.
_DEFAULTS = {
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "do_pan_and_scan": False,
}
_PIL_BILINEAR = 2


def _setting(config, name):
    value = config.get(name)
    return _DEFAULTS[name] if value is None else value


def _per_channel(name, value):
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"`{name}` must be a number or 3 per-channel numbers; got {value}.")
    return values


def _image_size(size):
    if isinstance(size, int):
        return (size, size)
    if set(size) - {"height", "width"} or not {"height", "width"} <= set(size):
        raise ValueError(
            f"Only a fixed `size` with `height` and `width` is supported; got {size}. "
            "Gemma 3 checkpoints resize to a fixed square."
        )
    return (int(size["height"]), int(size["width"]))


def image_converter_kwargs_from_hf(preprocessor_config):
    """`T5Gemma2ImageConverter` arguments from a Gemma 3 image processor config.

    Args:
        preprocessor_config: dict, the parsed `preprocessor_config.json`, or a
            `processor_config.json` holding it under `"image_processor"`.

    Returns:
        dict with `image_size`, `scale` and `offset`.

    Raises:
        ValueError: for settings the converter does not reproduce: pan and
            scan, a filter other than bilinear, sizes other than a fixed
            height and width, no RGB conversion, or another processor type.

    Example:
    ```python
    from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import T5Gemma2ImageConverter

    kwargs = image_converter_kwargs_from_hf({
        "size": {"height": 896, "width": 896}, "rescale_factor": 1 / 255,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    })
    converter = T5Gemma2ImageConverter(**kwargs)
    ```
    """
    config = preprocessor_config.get("image_processor", preprocessor_config)
    processor_type = config.get("image_processor_type")
    if processor_type is not None and not processor_type.startswith("Gemma3ImageProcessor"):
        raise ValueError(f"Expected a Gemma 3 image processor config; got `image_processor_type` {processor_type!r}.")
    if _setting(config, "do_pan_and_scan"):
        raise ValueError(
            "`do_pan_and_scan: true` is not supported: the converter gives one full image per input, "
            "without pan-and-scan crops."
        )
    if _setting(config, "resample") != _PIL_BILINEAR:
        raise ValueError(
            f"Only bilinear resampling (`resample: {_PIL_BILINEAR}`) is supported; got "
            f"`resample: {config['resample']}`."
        )
    if not _setting(config, "do_convert_rgb"):
        raise ValueError("`do_convert_rgb: false` is not supported: the converter always converts to RGB.")

    image_size = _image_size(_setting(config, "size")) if _setting(config, "do_resize") else None
    rescale_factor = float(_setting(config, "rescale_factor")) if _setting(config, "do_rescale") else 1.0
    if _setting(config, "do_normalize"):
        mean = _per_channel("image_mean", _setting(config, "image_mean"))
        std = _per_channel("image_std", _setting(config, "image_std"))
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    return {
        "image_size": image_size,
        "scale": [rescale_factor / s for s in std],
        "offset": [-m / s for m, s in zip(mean, std)],
    }


def hf_image_processor_from_converter(image_size, scale, offset):
    """A Gemma 3 image processor config (dict) for a converter's `image_size`, `scale` and `offset`.

    The inverse of `image_converter_kwargs_from_hf`, with `rescale_factor`
    1/255: `std = rescale_factor / scale` and `mean = -offset * std` per
    channel (rounded to 10 decimals, so that 0.5 stays 0.5).
    """
    if image_size is None or image_size[0] != image_size[1]:
        raise ValueError(f"The Gemma 3 image processor resizes to a fixed square; the converter has {image_size}.")
    rescale_factor = _DEFAULTS["rescale_factor"]
    scale = _per_channel("scale", 1.0 if scale is None else scale)
    offset = _per_channel("offset", 0.0 if offset is None else offset)
    std = [round(rescale_factor / s, 10) for s in scale]
    mean = [round(-o * s, 10) for o, s in zip(offset, std)]
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": int(image_size[0]), "width": int(image_size[1])},
        "resample": _PIL_BILINEAR,
        "do_rescale": True,
        "rescale_factor": rescale_factor,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_pan_and_scan": False,
    }
