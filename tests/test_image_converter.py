"""T5Gemma2ImageConverter against the reference Gemma 3 image processor (PIL backend)."""

import keras
import numpy as np
import PIL
import pytest
import tensorflow as tf
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from keras_t5gemma.conversion.image_processor import image_converter_kwargs_from_hf
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import T5Gemma2ImageConverter

# The converter follows Pillow 13's choice of which axis to resample first.
pytestmark = pytest.mark.skipif(
    int(PIL.__version__.split(".")[0]) < 13, reason="the reference numerics are Pillow 13's"
)
TOLERANCE = 1e-5
# One uint8 level after scaling to [-1, 1].
ONE_LEVEL = 1 / 127.5


def reference_pixels(images, size, **settings):
    """The reference `pixel_values`, channels last `(B, H, W, 3)`."""
    processor = Gemma3ImageProcessorPil(size={"height": size[0], "width": size[1]}, **settings)
    outputs = processor(images, input_data_format="channels_last", return_tensors="np")
    return outputs["pixel_values"].transpose(0, 2, 3, 1)


def max_diff(ours, reference):
    ours = np.asarray(ours)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    assert ours.dtype == np.float32
    return float(np.abs(ours.astype(np.float64) - reference).max())


def random_image(rng, height, width, channels=3):
    """Noise on a gradient: both rounding-sensitive smooth areas and sharp edges."""
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    noise = rng.normal(0, 20, (height, width, channels))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "input_size, image_size",
    [
        pytest.param((37, 50), (28, 28), id="downscale", marks=pytest.mark.backend_smoke),
        pytest.param((9, 13), (28, 28), id="upscale-odd"),
        pytest.param((20, 61), (28, 28), id="taller-narrower"),
        # Height shrinks more than twice as much as width: Pillow 13 resizes height first.
        pytest.param((61, 33), (28, 28), id="height-first"),
        pytest.param((33, 47), (24, 40), id="non-square-target"),
        pytest.param((300, 203), (28, 28), id="large-downscale"),
        pytest.param((480, 640), (896, 896), id="released-upscale"),
        pytest.param((1000, 701), (896, 896), id="released-height-first"),
    ],
)
def test_uint8_arrays_match_reference(rng, input_size, image_size):
    converter = T5Gemma2ImageConverter(image_size=image_size)
    image = random_image(rng, *input_size)
    reference = reference_pixels(image, image_size)
    assert max_diff(converter(image), reference[0]) <= TOLERANCE
    if image_size[0] < 100:
        batch = np.stack([image, random_image(rng, *input_size)])
        assert max_diff(converter(batch), reference_pixels(list(batch), image_size)) <= TOLERANCE


def test_list_of_arrays_of_different_sizes_is_a_batch(rng):
    converter = T5Gemma2ImageConverter(image_size=(28, 28))
    images = [random_image(rng, 37, 50), random_image(rng, 9, 13), random_image(rng, 61, 33)]
    assert max_diff(converter(images), reference_pixels(images, (28, 28))) <= TOLERANCE
    assert max_diff(converter(tuple(images)), reference_pixels(images, (28, 28))) <= TOLERANCE


def test_pil_images_of_any_mode_match_reference(rng):
    converter = T5Gemma2ImageConverter(image_size=(28, 28))
    rgba = np.concatenate([random_image(rng, 40, 31), rng.integers(0, 256, (40, 31, 1), np.uint8)], -1)
    images = [
        Image.fromarray(random_image(rng, 37, 50)),
        Image.fromarray(rgba),
        Image.fromarray(random_image(rng, 19, 23, channels=1)[..., 0]),
        Image.fromarray(random_image(rng, 30, 30)).convert("P"),
    ]
    assert [image.mode for image in images] == ["RGB", "RGBA", "L", "P"]
    reference = reference_pixels(images, (28, 28))
    assert max_diff(converter(images), reference) <= TOLERANCE
    for image, expected in zip(images, reference):
        assert max_diff(converter(image), expected) <= TOLERANCE


def test_integer_arrays_are_read_as_uint8(rng):
    converter = T5Gemma2ImageConverter(image_size=(28, 28))
    image = random_image(rng, 37, 50)
    np.testing.assert_array_equal(converter(image.astype("int64")), converter(image))


def test_float_images_hold_0_to_255_and_skip_the_uint8_rounding(rng):
    converter = T5Gemma2ImageConverter(image_size=(28, 28))
    image = random_image(rng, 37, 50)
    # Integer-valued floats: the same filter, within one uint8 level of the rounded reference.
    difference = max_diff(converter(image.astype("float32")), reference_pixels(image, (28, 28))[0])
    assert 0 < difference <= ONE_LEVEL + TOLERANCE
    # Without resizing, floats are only scaled: nothing is rounded.
    same_size = T5Gemma2ImageConverter(image_size=(37, 50))
    fractional = image.astype("float32") + 0.25
    np.testing.assert_allclose(same_size(fractional), fractional / 127.5 - 1, atol=TOLERANCE)
    # The filter's rows sum to one, so a flat image stays flat at its exact value.
    flat = np.full((61, 33, 3), 100.4, dtype="float32")
    np.testing.assert_allclose(converter(flat), np.full((28, 28, 3), 100.4 / 127.5 - 1), atol=TOLERANCE)


def test_inside_tf_data_gives_the_same_values(rng):
    converter = T5Gemma2ImageConverter(image_size=(28, 28))
    images = [random_image(rng, 37, 50), random_image(rng, 61, 33)]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
    ).map(converter)
    assert dataset.element_spec.shape.as_list() == [28, 28, 3]
    outputs = np.stack([x.numpy() for x in dataset])
    assert max_diff(outputs, reference_pixels(images, (28, 28))) <= TOLERANCE

    batch = np.stack([random_image(rng, 37, 50) for _ in range(4)])
    batched = tf.data.Dataset.from_tensor_slices(batch).batch(2).map(converter)
    assert batched.element_spec.shape.as_list() == [None, 28, 28, 3]
    outputs = np.concatenate([x.numpy() for x in batched])
    assert max_diff(outputs, reference_pixels(list(batch), (28, 28))) <= TOLERANCE


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((5, 5), np.uint8), "rank 3"),
        (np.zeros((1, 2, 5, 5, 3), np.uint8), "rank 3"),
        (np.zeros((5, 5, 4), np.uint8), "3 channels"),
        (np.zeros((2, 5, 5, 1), np.uint8), "3 channels"),
        (np.zeros((5, 0, 3), np.uint8), "positive height and width"),
        ([np.zeros((1, 5, 5, 3), np.uint8)], "Each image in a list must have rank 3"),
        (np.full((5, 5, 3), 256), r"\[0, 255\]"),
        (np.zeros((5, 5, 3), bool), "dtype"),
    ],
)
def test_bad_images_raise(images, message):
    with pytest.raises(ValueError, match=message):
        T5Gemma2ImageConverter(image_size=(8, 8))(images)


def test_bad_images_raise_inside_tf_data():
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((2, 5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        dataset.map(T5Gemma2ImageConverter(image_size=(8, 8)))


def test_different_sizes_need_an_image_size():
    with pytest.raises(ValueError, match="different sizes"):
        T5Gemma2ImageConverter(image_size=None)([np.zeros((5, 5, 3), np.uint8), np.zeros((6, 5, 3), np.uint8)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crop_to_aspect_ratio": True}, "does not take"),
        ({"interpolation": "nearest"}, "does not take"),
        ({"image_size": (0, 8)}, "image_size"),
        ({"image_size": (8,)}, "image_size"),
        ({"scale": [1.0, 2.0]}, "3 per-channel"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        T5Gemma2ImageConverter(**kwargs)


def test_config_round_trip(rng):
    converter = T5Gemma2ImageConverter(image_size=(24, 40), scale=[0.01, 0.02, 0.03], offset=[-1.0, 0.0, 1.0])
    config = converter.get_config()
    assert config["image_size"] == (24, 40)
    assert "crop_to_aspect_ratio" not in config and "interpolation" not in config
    restored = T5Gemma2ImageConverter.from_config(config)
    deserialized = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(converter))
    assert type(deserialized) is T5Gemma2ImageConverter
    image = random_image(rng, 37, 50)
    np.testing.assert_array_equal(restored(image), converter(image))
    np.testing.assert_array_equal(deserialized(image), converter(image))


def test_defaults_are_the_released_settings(rng):
    converter = T5Gemma2ImageConverter()
    assert converter.image_size == (896, 896)
    assert converter.backbone_cls is T5Gemma2Backbone
    image = random_image(rng, 50, 37)
    assert max_diff(converter(image), reference_pixels(image, (896, 896))[0]) <= TOLERANCE


RELEASED_CONFIG = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5],
    "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}


def test_hf_config_mapping_of_the_released_settings():
    kwargs = image_converter_kwargs_from_hf(RELEASED_CONFIG)
    assert kwargs["image_size"] == (896, 896)
    np.testing.assert_allclose(kwargs["scale"], [1 / 127.5] * 3)
    np.testing.assert_allclose(kwargs["offset"], [-1.0] * 3)
    # T5Gemma 2's `processor_config.json` nests the same settings.
    assert image_converter_kwargs_from_hf({"image_processor": RELEASED_CONFIG}) == kwargs


def test_hf_config_mapping_matches_the_reference(rng):
    settings = {
        "size": {"height": 20, "width": 36},
        "rescale_factor": 1 / 250,
        "image_mean": [0.48, 0.46, 0.41],
        "image_std": [0.27, 0.26, 0.28],
    }
    converter = T5Gemma2ImageConverter(**image_converter_kwargs_from_hf(settings))
    image = random_image(rng, 37, 50)
    reference = Gemma3ImageProcessorPil(**settings)(image, input_data_format="channels_last", return_tensors="np")
    assert max_diff(converter(image), reference["pixel_values"].transpose(0, 2, 3, 1)[0]) <= TOLERANCE


def test_hf_config_mapping_without_resize_rescale_or_normalize():
    kwargs = image_converter_kwargs_from_hf({"do_resize": False, "do_rescale": False, "do_normalize": False})
    assert kwargs == {"image_size": None, "scale": [1.0] * 3, "offset": [0.0] * 3}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"do_pan_and_scan": True}, "do_pan_and_scan"),
        ({"resample": 3}, "bilinear"),
        ({"size": {"shortest_edge": 896}}, "height"),
        ({"do_convert_rgb": False}, "do_convert_rgb"),
        ({"image_processor_type": "SiglipImageProcessor"}, "Gemma 3"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ],
)
def test_hf_config_mapping_rejects_unsupported_settings(override, message):
    with pytest.raises(ValueError, match=message):
        image_converter_kwargs_from_hf({**RELEASED_CONFIG, **override})
