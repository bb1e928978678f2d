"""Images through the SigLIP tower, projector and placeholder merge, against `transformers`."""

import warnings

import keras
import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from hf_reference import BOI
from hf_reference import EOI
from hf_reference import IMAGE
from hf_reference import backbone_from_reference
from hf_reference import reference_model
from hf_reference import tiny_config

# (image_size, patch_size, mm_tokens_per_image, vision hidden, heads)
GEOMETRIES = {
    "28px_patch7_4tokens": (28, 7, 4, 16, 2),
    "32px_patch4_16tokens": (32, 4, 16, 24, 3),
    "24px_patch6_1token": (24, 6, 1, 16, 4),
}


def _parametrize():
    # The first geometry is re-run on the torch and tensorflow backends.
    smoke = next(iter(GEOMETRIES))
    return [pytest.param(name, marks=[pytest.mark.backend_smoke] if name == smoke else []) for name in GEOMETRIES]


@pytest.fixture(scope="module", params=_parametrize())
def pair(request):
    image_size, patch_size, tokens, hidden, heads = GEOMETRIES[request.param]
    config = tiny_config(
        vision={
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": hidden,
            "num_attention_heads": heads,
        },
        mm_tokens_per_image=tokens,
    )
    model = reference_model(config, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = backbone_from_reference(model, config, text_only=False)
    return model, backbone, image_size, tokens


def _prompt(rng, images, tokens, length):
    """Text with `images` image blocks (<boi> placeholders <eoi>) spread through it, right-padded."""
    ids = list(rng.integers(3, 290, 3))
    for _ in range(images):
        ids += [BOI] + [IMAGE] * tokens + [EOI] + list(rng.integers(3, 290, 2))
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return ids + [0] * (length - len(ids)), mask


def _batch(rng, image_counts, tokens, image_size, slots):
    length = max(3 + n * (tokens + 4) for n in image_counts) + 1
    prompts = [_prompt(rng, n, tokens, length) for n in image_counts]
    ids = np.array([p[0] for p in prompts], "int32")
    mask = np.array([p[1] for p in prompts], "int32")
    # Padding slots hold noise, which must not reach the output.
    images = rng.normal(size=(len(image_counts), slots, image_size, image_size, 3)).astype("float32")
    flat = np.concatenate([images[b, :n] for b, n in enumerate(image_counts)], axis=0)
    return ids, mask, images, flat


def _reference(model, ids, mask, flat_images, decoder_ids):
    pixel_values = torch.tensor(flat_images.transpose(0, 3, 1, 2)) if len(flat_images) else None
    with torch.no_grad():
        encoder = model.model.encoder(
            input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask), pixel_values=pixel_values
        ).last_hidden_state
        logits = model(
            input_ids=torch.tensor(ids).long(),
            attention_mask=torch.tensor(mask),
            pixel_values=pixel_values,
            decoder_input_ids=torch.tensor(decoder_ids).long(),
        ).logits
    return encoder.numpy(), logits.numpy()


def test_batch_with_0_1_and_2_images_matches_reference(pair, rng):
    model, backbone, image_size, tokens = pair
    ids, mask, images, flat = _batch(rng, [2, 0, 1], tokens, image_size, slots=2)
    decoder_ids = np.array([[2, 5, 9, 11]] * 3, "int32")
    reference_encoder, reference_logits = _reference(model, ids, mask, flat, decoder_ids)
    # Compiled: a whole-graph compile costs a third of running the ops one by one at new shapes.
    outputs = backbone.predict_on_batch(
        {
            "encoder_token_ids": ids,
            "encoder_padding_mask": mask,
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": np.ones_like(decoder_ids),
            "images": images,
        }
    )
    encoder = outputs["encoder_sequence_output"]
    logits = keras.ops.convert_to_numpy(backbone.token_embedding.logits(outputs["decoder_sequence_output"]))
    assert_matches_reference(encoder, reference_encoder, np.repeat(mask[..., None], encoder.shape[-1], -1))
    assert_matches_reference(logits, reference_logits)


def test_text_only_input_to_a_vision_backbone_matches_reference(pair, rng):
    model, backbone, _, _ = pair
    ids = rng.integers(3, 290, (2, 9)).astype("int32")
    mask = np.ones_like(ids)
    decoder_ids = np.array([[2, 7, 8]] * 2, "int32")
    reference_encoder, reference_logits = _reference(model, ids, mask, np.zeros((0,)), decoder_ids)
    inputs = {
        "encoder_token_ids": ids,
        "encoder_padding_mask": mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": np.ones_like(decoder_ids),
    }
    outputs = backbone.predict_on_batch(inputs)  # no `images` at all
    assert_matches_reference(outputs["encoder_sequence_output"], reference_encoder)
    encoded = backbone.encode(ids, mask)  # the vision tower is not called
    assert_matches_reference(keras.ops.convert_to_numpy(encoded), reference_encoder)


def test_image_features_match_reference_projector(pair, rng):
    model, backbone, image_size, tokens = pair
    images = rng.normal(size=(3, image_size, image_size, 3)).astype("float32")
    with torch.no_grad():
        reference = model.model.encoder.get_image_features(
            torch.tensor(images.transpose(0, 3, 1, 2)), return_dict=True
        ).pooler_output.numpy()
    ours = keras.ops.convert_to_numpy(backbone.vision_encoder(images))
    assert ours.shape == (3, tokens, 32)
    assert_matches_reference(ours, reference)


@pytest.mark.parametrize(
    "image_counts, slots, message",
    [
        ([2, 1], 1, "Sample 0 has placeholders for 2 image(s) but 1 image(s) were given"),
        ([1, 0], 0, "Sample 0 has 1 <start_of_image> marker(s) but no image was given"),
    ],
)
def test_placeholders_without_images_give_a_clear_error(pair, rng, image_counts, slots, message):
    _, backbone, image_size, tokens = pair
    ids, mask, images, _ = _batch(rng, image_counts, tokens, image_size, slots=max(slots, 1))
    inputs = {
        "encoder_token_ids": ids,
        "encoder_padding_mask": mask,
        "decoder_token_ids": np.full((2, 2), 2, "int32"),
        "decoder_padding_mask": np.ones((2, 2), "int32"),
        "images": images[:, :slots],
    }
    with pytest.raises(ValueError) as error:
        backbone(inputs)
    assert message in str(error.value)


def test_truncated_placeholder_run_gives_a_clear_error(pair, rng):
    _, backbone, image_size, tokens = pair
    if tokens == 1:
        pytest.skip("a single-token run cannot be cut")
    ids, mask, images, _ = _batch(rng, [1], tokens, image_size, slots=1)
    cut = np.where(ids[0] == IMAGE)[0][-1]
    ids, mask = ids[:, :cut], mask[:, :cut]
    with pytest.raises(ValueError, match="not a multiple of mm_tokens_per_image"):
        backbone.call(
            {
                "encoder_token_ids": ids,
                "encoder_padding_mask": mask,
                "decoder_token_ids": np.full((1, 2), 2, "int32"),
                "decoder_padding_mask": np.ones((1, 2), "int32"),
                "images": images,
            }
        )
