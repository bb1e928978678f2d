"""`T5Gemma2Seq2SeqLMPreprocessor`: training layout, image prompts, tf.data, errors,
and strings in/out through `T5Gemma2Seq2SeqLM`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from hf_reference import reference_model
from hf_reference import tiny_config

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2ImageConverter
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import T5Gemma2Tokenizer
from keras_t5gemma import T5Gemma2VisionEncoder
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor

TOKENS_PER_IMAGE = 4


@pytest.fixture(scope="module")
def tokenizer(small_proto):
    return T5Gemma2Tokenizer(small_proto, image_placeholder="<image_soft_token>")


@pytest.fixture(scope="module")
def preprocessor(tokenizer):
    return T5Gemma2Seq2SeqLMPreprocessor(
        tokenizer,
        T5Gemma2ImageConverter(image_size=(28, 28)),
        encoder_sequence_length=40,
        decoder_sequence_length=12,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
    )


def _ids(tokenizer, text):
    return list(np.asarray(tokenizer(text)))


def _real(row, mask):
    return [int(t) for t, m in zip(row, mask) if m]


def test_training_layout_is_the_reference_label_shift(tokenizer, preprocessor):
    prompts, targets = ["The quick brown fox.", "A fox"], ["jumped over", "slept."]
    x, y, sample_weight = preprocessor({"encoder_text": prompts, "decoder_text": targets})
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        assert _real(x["encoder_token_ids"][row], x["encoder_padding_mask"][row]) == [2] + _ids(tokenizer, prompt)
        assert _real(y[row], sample_weight[row]) == _ids(tokenizer, target) + [1]
    # transformers builds decoder inputs by shifting the labels right after <bos>.
    config = tiny_config()
    model = reference_model(config)
    labels = np.where(np.asarray(sample_weight) > 0, np.asarray(y), -100)
    expected = model.prepare_decoder_input_ids_from_labels(torch.tensor(labels)).numpy()
    decoder_mask = np.asarray(x["decoder_padding_mask"]).astype(bool)
    np.testing.assert_array_equal(np.asarray(x["decoder_token_ids"])[decoder_mask], expected[decoder_mask])
    assert "images" in x and np.asarray(x["images"]).shape == (2, 0, 28, 28, 3)


def test_encoder_and_decoder_strings_as_x_and_y(preprocessor):
    as_dict = preprocessor({"encoder_text": ["The fox"], "decoder_text": ["slept."]})
    as_pair = preprocessor(["The fox"], ["slept."])
    for a, b in zip(keras.tree.flatten(as_dict), keras.tree.flatten(as_pair)):
        np.testing.assert_array_equal(a, b)


def test_images_in_a_batch_with_different_counts(tokenizer, preprocessor, rng):
    images = [
        [rng.integers(0, 255, (30, 20, 3), dtype="uint8"), rng.integers(0, 255, (28, 28, 3), dtype="uint8")],
        [],
        rng.integers(0, 255, (40, 40, 3), dtype="uint8"),
    ]
    x, _, _ = preprocessor(
        {
            "encoder_text": ["A <start_of_image> and <start_of_image>.", "No image.", "<start_of_image> fox"],
            "decoder_text": ["two", "none", "one"],
            "images": images,
        }
    )
    ids = np.asarray(x["encoder_token_ids"])
    placeholder = tokenizer.image_placeholder_token_id
    assert list((ids == placeholder).sum(axis=1)) == [8, 0, 4]
    converted = np.asarray(x["images"])
    assert converted.shape == (3, 2, 28, 28, 3)
    np.testing.assert_array_equal(converted[1], 0)
    np.testing.assert_array_equal(converted[2, 1], 0)
    converter = preprocessor.image_converter
    np.testing.assert_allclose(converted[0, 0], np.asarray(converter(images[0][0])))
    row = list(ids[0])
    start = row.index(tokenizer.start_of_image_token_id)
    assert row[start + 1 : start + 1 + TOKENS_PER_IMAGE] == [placeholder] * TOKENS_PER_IMAGE
    assert row[start + 1 + TOKENS_PER_IMAGE] == tokenizer.end_of_image_token_id


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("One <start_of_image> marker.", [[]], "1 <start_of_image> marker(s) but no image was given"),
        ("One <start_of_image> marker.", [[np.zeros((8, 8, 3), "uint8")] * 2], "placeholders for 1 image(s) but 2"),
        ("No marker.", [[np.zeros((8, 8, 3), "uint8")]], "placeholders for 0 image(s) but 1"),
    ],
)
def test_image_count_not_matching_markers_is_an_error(preprocessor, text, images, message):
    with pytest.raises(ValueError, match=None) as error:
        preprocessor.generate_preprocess({"encoder_text": [text], "images": images})
    assert message in str(error.value)


def test_prompt_longer_than_the_sequence_length_is_an_error(preprocessor):
    with pytest.raises(ValueError, match="encoder prompt has .* tokens but the encoder sequence length is 40"):
        preprocessor.generate_preprocess(["The quick brown fox " * 20])
    with pytest.raises(ValueError, match="decoder prompt"):
        preprocessor.generate_preprocess({"encoder_text": ["a"], "decoder_text": ["The quick brown fox " * 5]})


def test_training_without_targets_is_an_error(preprocessor):
    with pytest.raises(ValueError, match="Training needs targets"):
        preprocessor(["The fox"])


def test_tf_data_gives_the_same_batches(preprocessor, rng):
    prompts = ["The <start_of_image> fox.", "A <start_of_image> dog"]
    targets = ["jumped", "slept."]
    images = rng.integers(0, 255, (2, 1, 32, 32, 3), dtype="uint8")
    eager = preprocessor({"encoder_text": prompts, "decoder_text": targets, "images": images})
    dataset = tf.data.Dataset.from_tensor_slices(
        {"encoder_text": prompts, "decoder_text": targets, "images": images}
    ).batch(2)
    in_graph = next(iter(dataset.map(preprocessor)))
    for a, b in zip(keras.tree.flatten(eager), keras.tree.flatten(in_graph)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_image_prompt_matches_the_reference_processor(gemma3_proto, tmp_path, rng):
    """Prompt expansion and pixels against transformers' Gemma3Processor on the real vocabulary."""
    from transformers import Gemma3Processor
    from transformers import GemmaTokenizer
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    (tmp_path / "tokenizer.model").write_bytes(gemma3_proto)
    reference_tokenizer = GemmaTokenizer.from_pretrained(
        tmp_path,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<unused99>",
        },
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    reference = Gemma3Processor(image_processor, reference_tokenizer, image_seq_length=TOKENS_PER_IMAGE)
    prompt = "Describe this.<start_of_image>Then this:<start_of_image> and compare."
    images = [rng.integers(0, 255, (50, 40, 3), dtype="uint8"), rng.integers(0, 255, (20, 30, 3), dtype="uint8")]
    expected = reference(text=[prompt], images=[images], return_tensors="np")

    ours = T5Gemma2Seq2SeqLMPreprocessor(
        T5Gemma2Tokenizer(gemma3_proto),
        T5Gemma2ImageConverter(image_size=(28, 28)),
        encoder_sequence_length=64,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        add_start_token=False,
    ).generate_preprocess({"encoder_text": [prompt], "images": [images]})
    assert _real(ours["encoder_token_ids"][0], ours["encoder_padding_mask"][0]) == expected["input_ids"][0].tolist()
    np.testing.assert_allclose(np.asarray(ours["images"])[0], expected["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5)


@pytest.fixture(scope="module")
def seq_2_seq_lm(tokenizer, preprocessor):
    vision = T5Gemma2VisionEncoder(
        image_size=28,
        patch_size=7,
        hidden_dim=16,
        intermediate_dim=24,
        num_layers=1,
        num_heads=2,
        output_dim=32,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
    )
    backbone = T5Gemma2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        hidden_dim=32,
        intermediate_dim=48,
        num_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
        sliding_window=8,
        eoi_token_id=tokenizer.end_of_image_token_id,
        image_token_id=tokenizer.image_placeholder_token_id,
        vision_encoder=vision,
    )
    model = T5Gemma2Seq2SeqLM(backbone, preprocessor)
    model.compile(sampler="greedy")
    return model


def test_generate_from_strings_and_images(seq_2_seq_lm, rng):
    text = seq_2_seq_lm.generate("The quick brown fox", max_length=8)
    assert isinstance(text, str)
    batch = seq_2_seq_lm.generate(
        {
            "encoder_text": ["A <start_of_image> cat", "A dog"],
            "images": [[rng.integers(0, 255, (28, 28, 3), dtype="uint8")], []],
        },
        max_length=8,
    )
    assert isinstance(batch, list) and len(batch) == 2


def test_generated_text_is_the_detokenized_greedy_ids(seq_2_seq_lm, tokenizer):
    inputs = seq_2_seq_lm.preprocessor.generate_preprocess(["The quick brown fox"], sequence_length=8)
    on_ids = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone)
    on_ids.compile(sampler="greedy")
    ids = on_ids.generate(inputs, stop_token_ids=None)["decoder_token_ids"][0]
    expected = tokenizer.detokenize([t for t in ids[1:].tolist() if t > 3])
    assert seq_2_seq_lm.generate(["The quick brown fox"], max_length=8, stop_token_ids=None)[0] == expected


def test_fit_on_strings_and_images(seq_2_seq_lm, rng):
    data = {
        "encoder_text": ["A <start_of_image> cat", "A dog", "The fox"] * 2,
        "decoder_text": ["cat", "dog", "fox"] * 2,
        # One image slot per sample; samples without a marker leave it unused.
        "images": rng.integers(0, 255, (6, 1, 28, 28, 3), dtype="uint8"),
    }
    model = T5Gemma2Seq2SeqLM(seq_2_seq_lm.backbone, seq_2_seq_lm.preprocessor)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x=data, batch_size=3, epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_config_round_trip_keeps_lengths_and_options(preprocessor):
    restored = T5Gemma2Seq2SeqLMPreprocessor.from_config(preprocessor.get_config())
    for name in (
        "encoder_sequence_length",
        "decoder_sequence_length",
        "mm_tokens_per_image",
        "max_images_per_prompt",
        "add_start_token",
        "add_end_token",
    ):
        assert getattr(restored, name) == getattr(preprocessor, name), name
    assert restored.image_converter.image_size == preprocessor.image_converter.image_size


def test_tf_data_text_only_batches_for_a_vision_model(preprocessor):
    dataset = tf.data.Dataset.from_tensor_slices(
        {"encoder_text": ["The fox", "A dog"], "decoder_text": ["jumped", "slept."]}
    ).batch(2)
    x, y, _ = next(iter(dataset.map(preprocessor)))
    assert tuple(x["images"].shape) == (2, 0, 28, 28, 3)
    eager, _, _ = preprocessor({"encoder_text": ["The fox", "A dog"], "decoder_text": ["jumped", "slept."]})
    np.testing.assert_array_equal(np.asarray(x["encoder_token_ids"]), np.asarray(eager["encoder_token_ids"]))
