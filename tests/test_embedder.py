"""`T5Gemma2Embedder`: pooled encoder vectors against `transformers`, image-only vectors,
padding/batch invariance, errors, loading without a decoder, saving, contrastive `fit`."""

import sys
from pathlib import Path
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from conftest import assert_matches_reference
from hf_checkpoints import checkpoint_config
from hf_checkpoints import write_checkpoint

from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma.conversion.checkpoint import HFCheckpoint
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from contrastive_pair_model import ContrastivePairModel  # noqa: E402

TEXTS = ["The quick brown fox jumped over the lazy dog.", "A fox", "def add(a, b): return a + b"]


def _image(rng, height=40, width=30):
    return rng.integers(0, 255, (height, width, 3), dtype="uint8")


@pytest.fixture(scope="module")
def checkpoint(small_proto, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    model = write_checkpoint(folder, checkpoint_config(), small_proto, seed=5)
    return folder, model


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The embedder from the Hugging Face checkpoint, and the tensors it read."""
    folder, _ = checkpoint
    read = []
    original = HFCheckpoint.read

    def recording_read(self, key):
        read.append(key)
        return original(self, key)

    with mock.patch.object(HFCheckpoint, "read", recording_read):
        embedder = T5Gemma2Embedder.from_preset(str(folder))
    embedder.preprocessor.sequence_length = 40
    return embedder, read


@pytest.fixture(scope="module")
def seq_2_seq_preset(checkpoint, tmp_path_factory):
    """A Keras preset saved from a (text-only) `T5Gemma2Seq2SeqLM`."""
    folder = tmp_path_factory.mktemp("keras_seq_2_seq")
    T5Gemma2Seq2SeqLM.from_preset(str(checkpoint[0]), text_only=True).save_to_preset(str(folder))
    return folder


def _reference(model, x, pooling="mean", normalize=True):
    """The reference encoder's outputs for preprocessed `x`, pooled in numpy."""
    ids = np.asarray(x["encoder_token_ids"]).astype("int64")
    mask = np.asarray(x["encoder_padding_mask"]).astype("int64")
    pixel_values = None
    if "images" in x:
        counts = (ids == model.config.image_token_index).sum(axis=1) // model.config.encoder.mm_tokens_per_image
        images = np.concatenate([np.asarray(x["images"])[b, :n] for b, n in enumerate(counts)])
        pixel_values = torch.tensor(images.transpose(0, 3, 1, 2)) if len(images) else None
    with torch.no_grad():
        hidden = model.model.encoder(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pixel_values
        ).last_hidden_state.numpy()
    if pooling == "mean":
        vectors = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    elif pooling == "first":
        vectors = hidden[:, 0]
    else:
        vectors = hidden[np.arange(len(ids)), mask.sum(axis=1) - 1]
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True) if normalize else vectors


def _fused(rng, **size):
    return {"text": "A photo <start_of_image> of a fox", "images": _image(rng, **size)}


@pytest.fixture(scope="module")
def keras_embedder(seq_2_seq_preset):
    """Text-only, from the Keras preset of the seq2seq model."""
    return T5Gemma2Embedder.from_preset(str(seq_2_seq_preset))


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("first", False), ("last", True)])
def test_text_vectors_match_pooled_reference_encoder_outputs(keras_embedder, checkpoint, pooling, normalize):
    embedder = keras_embedder
    if (pooling, normalize) != (embedder.pooling, embedder.normalize):
        embedder = T5Gemma2Embedder(embedder.backbone, embedder.preprocessor, pooling=pooling, normalize=normalize)
    vectors = embedder.predict(TEXTS, verbose=0)
    assert vectors.shape == (3, embedder.backbone.hidden_dim) and vectors.dtype == np.float32
    expected = _reference(checkpoint[1], embedder.preprocessor(TEXTS), pooling, normalize)
    assert_matches_reference(vectors, expected, atol=1e-5, rtol_to_scale=1e-5)


# The vision model's calls embed four prompts with one image slot at the
# fixture's length where they can, so that its compiled function is reused.
@pytest.mark.backend_smoke
def test_fused_vectors_match_pooled_reference_encoder_outputs(loaded, checkpoint, rng):
    embedder, _ = loaded
    inputs = [*TEXTS, _fused(rng)]
    vectors = embedder.predict(inputs, verbose=0)
    expected = _reference(checkpoint[1], embedder.preprocessor(inputs))
    assert_matches_reference(vectors, expected, atol=1e-5, rtol_to_scale=1e-5)


def test_images_change_fused_vectors(loaded, rng):
    embedder, _ = loaded
    vectors = embedder.predict([_fused(rng), _fused(rng), *TEXTS[:2]], verbose=0)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_padding_and_batch_composition_do_not_change_a_vector(loaded, rng):
    embedder, _ = loaded
    fused = _fused(rng)
    alone = embedder.predict(["A fox", fused, *TEXTS[::2]], verbose=0)
    two_images = {"text": "<start_of_image> and <start_of_image>", "images": [_image(rng), _image(rng, 20, 50)]}
    embedder.preprocessor.sequence_length = 64
    try:
        batch = embedder.predict([two_images, fused, TEXTS[2], "A fox"], verbose=0)
    finally:
        embedder.preprocessor.sequence_length = 40
    np.testing.assert_allclose(batch[[3, 1]], alone[:2], rtol=0, atol=1e-5)


def test_image_only_vectors_are_pooled_reference_image_features(loaded, checkpoint, rng):
    embedder, _ = loaded
    images = [_image(rng), _image(rng, 28, 28), _image(rng, 50, 20)]
    vectors = embedder.predict([{"images": images[0]}, *TEXTS, {"images": images[1:]}, _fused(rng)], verbose=0)
    pixel_values = embedder.preprocessor.convert_images(images).transpose(0, 3, 1, 2)
    with torch.no_grad():
        features = checkpoint[1].get_image_features(torch.tensor(pixel_values)).pooler_output.numpy()
    expected = np.stack([features[0].mean(axis=0), features[1:].mean(axis=(0, 1))])
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    assert_matches_reference(vectors[[0, 4]], expected, atol=1e-5, rtol_to_scale=1e-5)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "nothing to embed"),
        ("", "neither text nor images"),
        (["A fox", "  "], "Sample 1 has neither text nor images"),
        ([{"text": "A fox"}, {}], "Sample 1 has neither text nor images"),
        ({"text": "A fox", "image": None}, "got also \\['image'\\]"),
        (3, "must be strings"),
        (["<start_of_image> without its image"], "marker\\(s\\) but no image was given"),
    ],
)
def test_empty_or_malformed_input_is_a_clear_error(loaded, inputs, message):
    embedder, _ = loaded
    with pytest.raises(ValueError, match=message):
        embedder.predict(inputs, verbose=0)


def test_preprocessor_inside_tf_data(loaded):
    preprocessor = loaded[0].preprocessor
    texts = tf.data.Dataset.from_tensor_slices(TEXTS).batch(2)
    batches = list(texts.map(preprocessor))
    assert [tuple(batch["images"].shape) for batch in batches] == [(2, 0, 28, 28, 3), (1, 0, 28, 28, 3)]
    eager = preprocessor(TEXTS)
    np.testing.assert_array_equal(
        np.concatenate([batch["encoder_token_ids"] for batch in batches]), eager["encoder_token_ids"]
    )


def test_hf_checkpoint_loads_encoder_only(loaded):
    embedder, read = loaded
    backbone = embedder.backbone
    assert backbone.encoder_only and backbone.decoder is None and backbone.vision_encoder is not None
    assert not any("decoder" in weight.path for weight in embedder.weights)
    assert read and not any(key.startswith("model.decoder.") for key in read)


def test_keras_preset_of_a_seq_2_seq_lm_loads_without_its_decoder(keras_embedder):
    preprocessor = keras_embedder.preprocessor
    assert keras_embedder.backbone.decoder is None and keras_embedder.backbone.vision_encoder is None
    assert not any("decoder" in weight.path for weight in keras_embedder.weights)
    # The seq2seq preprocessor's encoder settings carry over.
    assert preprocessor.image_converter is None
    assert preprocessor.sequence_length == 512 and preprocessor.add_start_token


def _without_names(config):
    if isinstance(config, dict):
        return {k: _without_names(v) for k, v in config.items() if k != "name"}
    return config


def test_config_and_preset_round_trip(keras_embedder, tmp_path):
    embedder = T5Gemma2Embedder(keras_embedder.backbone, keras_embedder.preprocessor, pooling="last", normalize=False)
    config = _without_names(embedder.get_config())
    assert _without_names(T5Gemma2Embedder.from_config(embedder.get_config()).get_config()) == config
    embedder.save_to_preset(str(tmp_path))
    restored = T5Gemma2Embedder.from_preset(str(tmp_path))
    assert _without_names(restored.get_config()) == config
    for ours, theirs in zip(embedder.weights, restored.weights, strict=True):
        assert ours.path == theirs.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def test_contrastive_fit_lowers_the_loss(seq_2_seq_preset):
    embedder = T5Gemma2Embedder.from_preset(str(seq_2_seq_preset))
    embedder.preprocessor.sequence_length = 16
    queries = ["fox", "dog", "add", "cat", "12345", "phrase", "lazy", "brown"]
    positives = [
        "The quick fox.",
        "A lazy dog.",
        "def add(a, b)",
        "a photo of a cat",
        "Numbers 12345",
        "Une phrase.",
        "The lazy dog.",
        "quick brown",
    ]
    pairs = ContrastivePairModel(embedder, temperature=0.1)
    pairs.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = pairs.fit({"query": queries, "positive": positives}, batch_size=4, epochs=4, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
