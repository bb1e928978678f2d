"""The KerasHub T5Gemma 2 surface on this package's classes, checked with KerasHub's own `TestCase` helpers.

A KerasHub user changes one import: the constructor arguments keep KerasHub
0.32's names and meanings (asymmetric encoder and decoder included),
`call_encoder` and the cached-decoder calls return KerasHub's shapes, and a
model exported with `export_to_keras_hub` loads in KerasHub and generates the
same tokens there.
"""

import warnings

import keras
import keras_hub
import numpy as np
import pytest
from hf_reference import backbone_from_reference
from hf_reference import random_batch
from hf_reference import reference_model
from hf_reference import tiny_config
from keras_hub.src.tests.test_case import TestCase

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma import T5Gemma2ImageConverter
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import T5Gemma2Seq2SeqLMPreprocessor
from keras_t5gemma import T5Gemma2Tokenizer

# KerasHub's argument names; the decoder differs from the encoder in every size but the width.
ASYMMETRIC = {
    "vocabulary_size": 100,
    "encoder_hidden_dim": 32,
    "encoder_intermediate_dim": 96,
    "encoder_num_layers": 3,
    "encoder_num_attention_heads": 4,
    "encoder_num_key_value_heads": 2,
    "encoder_head_dim": 8,
    "encoder_layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "decoder_hidden_dim": 32,
    "decoder_intermediate_dim": 48,
    "decoder_num_layers": 2,
    "decoder_num_attention_heads": 2,
    "decoder_num_key_value_heads": 1,
    "decoder_head_dim": 16,
    "decoder_layer_types": ["full_attention", "sliding_attention"],
    "dropout_rate": 0.1,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 16,
    "hidden_activation": "gelu_approximate",
    "tie_word_embeddings": True,
    "sliding_window": 4,
    "cross_attention_hidden_size": 32,
    "attn_logit_softcapping": 50.0,
    "rope_max_wavelength": 10_000.0,
    "use_query_key_norm": True,
    "eoi_token_index": 98,
    "image_token_index": 99,
}


def _inputs(batch=2, encoder_length=10, decoder_length=6):
    return {
        "encoder_token_ids": np.ones((batch, encoder_length), "int32"),
        "encoder_padding_mask": np.ones((batch, encoder_length), "int32"),
        "decoder_token_ids": np.ones((batch, decoder_length), "int32"),
        "decoder_padding_mask": np.ones((batch, decoder_length), "int32"),
    }


class KerasHubSurfaceTest(TestCase):
    def test_asymmetric_backbone_with_keras_hub_arguments(self):
        self.run_backbone_test(
            cls=T5Gemma2Backbone,
            init_kwargs=ASYMMETRIC,
            input_data={key: keras.ops.convert_to_tensor(value) for key, value in _inputs().items()},
            expected_output_shape={"encoder_sequence_output": (2, 10, 32), "decoder_sequence_output": (2, 6, 32)},
            run_quantization_check=False,
        )

    def test_config_is_written_in_keras_hub_names_and_old_names_still_load(self):
        backbone = T5Gemma2Backbone(**ASYMMETRIC)
        config = backbone.get_config()
        for name, value in ASYMMETRIC.items():
            self.assertEqual(config[name], value)
        self.assertNotIn("hidden_dim", config)
        old = dict(
            vocabulary_size=100, hidden_dim=32, intermediate_dim=64, num_heads=4, num_key_value_heads=2,
            head_dim=8, num_encoder_layers=2, num_decoder_layers=1, layer_norm_epsilon=1e-5, dropout=0.1,
            eoi_token_id=98, image_token_id=99, local_rope_wavelength=5_000.0,
        )  # fmt: skip
        migrated = T5Gemma2Backbone.from_config(old).get_config()
        self.assertEqual(migrated["decoder_intermediate_dim"], 64)
        self.assertEqual(migrated["encoder_num_attention_heads"], 4)
        self.assertEqual(migrated["decoder_num_layers"], 1)
        self.assertEqual(migrated["rms_norm_eps"], 1e-5)
        self.assertEqual(migrated["dropout_rate"], 0.1)
        self.assertEqual(migrated["eoi_token_index"], 98)
        self.assertEqual(migrated["rope_max_wavelength"], 5_000.0)
        with self.assertRaisesRegex(ValueError, "`hidden_dim`.*`encoder_hidden_dim`"):
            T5Gemma2Backbone(**{**ASYMMETRIC, "hidden_dim": 64})

    def test_what_t5gemma_2_cannot_hold_is_refused(self):
        for change, message in (
            ({"decoder_hidden_dim": 16, "cross_attention_hidden_size": None}, "must be equal"),
            ({"cross_attention_hidden_size": 16}, "cross_attention_hidden_size"),
            ({"hidden_activation": "relu"}, "hidden_activation"),
            ({"attention_bias": True}, "attention_bias"),
            ({"tie_word_embeddings": False}, "tie_word_embeddings"),
            ({"sliding_window": None}, "sliding_window"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                T5Gemma2Backbone(**{**ASYMMETRIC, **change})

    def test_task_call_encoder_and_cache_shapes(self):
        backbone = T5Gemma2Backbone(**{**ASYMMETRIC, "dropout_rate": 0.0})
        seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone=backbone)
        inputs = _inputs()
        self.assertEqual(keras.ops.shape(seq_2_seq_lm(inputs)), (2, 6, 100))
        encoder_output, padding_mask = seq_2_seq_lm.call_encoder(
            inputs["encoder_token_ids"], inputs["encoder_padding_mask"]
        )
        self.assertEqual(keras.ops.shape(encoder_output), (2, 10, 32))
        hidden, (self_cache, cross_cache), _ = seq_2_seq_lm._build_cache(**inputs)
        self.assertEqual(keras.ops.shape(hidden), (2, 6, 32))
        # (batch, decoder layers, key/value, length, decoder key/value heads, decoder head size)
        self.assertEqual(keras.ops.shape(self_cache), (2, 2, 2, 6, 1, 16))
        self.assertEqual(keras.ops.shape(cross_cache), (2, 2, 2, 10, 1, 16))
        # The cached decoder pass computes the full forward's logits.
        logits, _, _ = seq_2_seq_lm.call_decoder_with_cache(
            inputs["decoder_token_ids"],
            inputs["decoder_padding_mask"],
            (keras.ops.zeros_like(self_cache), cross_cache),
            0,
            encoder_output,
            padding_mask,
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(logits), keras.ops.convert_to_numpy(seq_2_seq_lm(inputs)), atol=1e-5
        )
        with self.assertRaisesRegex(ValueError, "vision_indices"):
            seq_2_seq_lm.call_encoder(inputs["encoder_token_ids"], padding_mask, vision_indices=padding_mask)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An asymmetric random T5Gemma 2 from `transformers`, ours, and KerasHub's from our export."""
    config = tiny_config(
        text={"intermediate_size": 64, "sliding_window": 64},
        decoder={
            "intermediate_size": 40,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "layer_types": ["full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            },
        },
    )
    model = reference_model(config, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = T5Gemma2Seq2SeqLM(backbone_from_reference(model, config))
    ours.compile(sampler="greedy")
    folder = tmp_path_factory.mktemp("keras_hub") / "preset"
    ours.export_to_keras_hub(folder)
    theirs = keras_hub.models.T5Gemma2Seq2SeqLM.from_preset(str(folder))
    theirs.compile(sampler="greedy")
    return model, ours, theirs, folder


def test_an_export_loads_in_keras_hub_with_the_same_logits_and_greedy_tokens(exported, rng):
    model, ours, theirs, _ = exported
    assert type(theirs).__module__.startswith("keras_hub")
    encoder_ids, encoder_mask, decoder_ids, decoder_mask = random_batch(rng, 2, [9, 6], [1, 1], 9, 8)
    encoder_ids[0, 1] = 7  # the end-of-image token computes differently in KerasHub's text-only model
    inputs = {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids.astype("int32"),
        "decoder_padding_mask": decoder_mask.astype("int32"),
    }
    full = {**inputs, "decoder_padding_mask": np.ones_like(inputs["decoder_padding_mask"])}
    ours_logits = np.asarray(ours.predict_on_batch(full))
    theirs_logits = np.asarray(theirs.predict_on_batch(full))
    assert np.abs(ours_logits - theirs_logits).max() <= 1e-5 * np.abs(ours_logits).max()
    ours_tokens = ours.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    theirs_tokens = theirs.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    np.testing.assert_array_equal(np.asarray(ours_tokens), np.asarray(theirs_tokens))
    # And the reference's greedy tokens from the same weights (asymmetric parity).
    import torch

    with torch.no_grad():
        reference = model.generate(
            input_ids=torch.tensor(encoder_ids),
            attention_mask=torch.tensor(encoder_mask),
            decoder_input_ids=torch.tensor(decoder_ids[:, :1]),
            max_length=8,
            min_length=8,
            do_sample=False,
        )
    np.testing.assert_array_equal(np.asarray(ours_tokens), reference.numpy())


def test_export_refuses_what_keras_hub_cannot_hold_and_foreign_folders(exported, tmp_path):
    _, ours, _, folder = exported
    other_rope = T5Gemma2Backbone(**{**ASYMMETRIC, "global_rope_max_wavelength": 500_000.0})
    with pytest.raises(ValueError, match="RoPE"):
        other_rope.export_to_keras_hub(tmp_path / "rope")
    # A user's file beside the export is kept, never overwritten or deleted.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    ours.export_to_keras_hub(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "mine" / "config.json").exists()
    with pytest.raises(FileExistsError):
        ours.export_to_keras_hub(folder)


# === The tokenizer and preprocessor under KerasHub's names, on a vocabulary without image pieces ===

ENCODER_TEXTS = ["The quick brown fox", "def add(a, b):"]
DECODER_TEXTS = ["jumped over", "return a + b"]


class KerasHubPreprocessingTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from vocabularies import train_vocabulary

        # Only <pad>, <eos>, <bos> (and <unk>) are special, as in KerasHub's test vocabulary.
        cls.text_only_proto = train_vocabulary(special_pieces=[])

    def test_tokenizer_needs_no_image_pieces(self):
        tokenizer = T5Gemma2Tokenizer(proto=self.text_only_proto)
        self.assertEqual((tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id), (0, 1, 2))
        self.assertIsNone(tokenizer.start_of_image_token_id)
        self.assertIsNone(tokenizer.end_of_image_token_id)
        self.assertIsNone(tokenizer.image_placeholder_token_id)
        self.assertEqual(len(tokenizer.missing_image_tokens), 3)
        self.assertEqual(sorted(tokenizer.special_token_ids), [0, 1, 2])
        self.run_preprocessing_layer_test(
            cls=T5Gemma2Tokenizer, init_kwargs={"proto": self.text_only_proto}, input_data=ENCODER_TEXTS
        )

    def test_preprocessor_with_keras_hub_arguments(self):
        tokenizer = T5Gemma2Tokenizer(proto=self.text_only_proto)
        init_kwargs = {
            "tokenizer": tokenizer,
            "encoder_sequence_length": 24,
            "decoder_sequence_length": 16,
            "image_size": 14,
            "num_vision_tokens_per_image": 4,
            "add_start_token": True,
            "add_end_token": False,
        }
        # The reference's layout: encoder <bos> + prompt; decoder <bos> + target (+ <eos>, whose label is
        # padding); labels target + <eos>.
        bos, eos, pad = 2, 1, 0
        encoder, decoder, labels = [], [], []
        for prompt, target in zip(ENCODER_TEXTS, DECODER_TEXTS):
            prompt_ids, target_ids = np.asarray(tokenizer(prompt)).tolist(), np.asarray(tokenizer(target)).tolist()
            self.assertLess(len(prompt_ids), 23)  # no truncation
            self.assertLess(len(target_ids), 15)
            encoder.append([bos] + prompt_ids + [pad] * (23 - len(prompt_ids)))
            decoder.append([bos] + target_ids + [eos] + [pad] * (14 - len(target_ids)))
            labels.append(target_ids + [eos] + [pad] * (15 - len(target_ids)))
        expected_x = {
            "encoder_token_ids": encoder,
            "encoder_padding_mask": [[token != pad for token in row] for row in encoder],
            "decoder_token_ids": decoder,
            "decoder_padding_mask": [[token != pad for token in row] for row in decoder],
            # No image slots: the vocabulary holds text only.
            "images": np.zeros((2, 0, 14, 14, 3), "float32"),
        }
        self.run_preprocessing_layer_test(
            cls=T5Gemma2Seq2SeqLMPreprocessor,
            init_kwargs=init_kwargs,
            input_data=({"encoder_text": ENCODER_TEXTS, "decoder_text": DECODER_TEXTS},),
            expected_output=(expected_x, labels, [[token != pad for token in row] for row in labels]),
        )
        preprocessor = T5Gemma2Seq2SeqLMPreprocessor(**init_kwargs)
        config = preprocessor.get_config()
        self.assertEqual((config["image_size"], config["num_vision_tokens_per_image"]), (14, 4))
        self.assertNotIn("mm_tokens_per_image", config)
        self.assertEqual(preprocessor.image_converter.image_size, (14, 14))

    def test_images_with_a_text_only_vocabulary_are_refused_naming_the_pieces(self):
        preprocessor = T5Gemma2Seq2SeqLMPreprocessor(
            tokenizer=T5Gemma2Tokenizer(proto=self.text_only_proto),
            encoder_sequence_length=32,
            decoder_sequence_length=8,
            image_size=14,
            num_vision_tokens_per_image=4,
        )
        image = np.zeros((20, 20, 3), "uint8")
        message = "no `<start_of_image>`, `<end_of_image>`, the image placeholder.*text only"
        with self.assertRaisesRegex(ValueError, message):
            preprocessor.generate_preprocess({"encoder_text": ["a photo of"], "images": [[image]]})
        with self.assertRaisesRegex(ValueError, message):
            preprocessor({"encoder_text": ["a photo of"], "decoder_text": ["a cat"], "images": [[image]]})
        # `<start_of_image>` is plain text here, and text-only prompts work.
        x = preprocessor.generate_preprocess({"encoder_text": ["a photo of <start_of_image>"]})
        self.assertEqual(tuple(x["images"].shape), (1, 0, 14, 14, 3))

    def test_earlier_names_load_and_conflicts_are_named(self):
        tokenizer = T5Gemma2Tokenizer(proto=self.text_only_proto)
        old = T5Gemma2Seq2SeqLMPreprocessor(tokenizer=tokenizer, mm_tokens_per_image=9)
        self.assertEqual((old.num_vision_tokens_per_image, old.mm_tokens_per_image), (9, 9))
        digits = T5Gemma2Seq2SeqLMPreprocessor.from_preset("t5gemma2_tiny_digits")  # saved with the old names
        self.assertEqual(digits.num_vision_tokens_per_image, 4)
        self.assertEqual(digits.get_config()["image_size"], 16)
        with self.assertRaisesRegex(ValueError, "`mm_tokens_per_image`.*`num_vision_tokens_per_image`"):
            T5Gemma2Seq2SeqLMPreprocessor(tokenizer=tokenizer, mm_tokens_per_image=9, num_vision_tokens_per_image=4)
        with self.assertRaisesRegex(ValueError, "`image_size` is 14 but the image converter makes images"):
            T5Gemma2Seq2SeqLMPreprocessor(
                tokenizer=tokenizer, image_converter=T5Gemma2ImageConverter(image_size=(16, 16)), image_size=14
            )
        with self.assertRaisesRegex(ValueError, "pass `encoder_sequence_length`.*by keyword"):
            T5Gemma2Seq2SeqLMPreprocessor(tokenizer, 64, 32)

    def test_task_trains_predicts_and_saves_as_keras_hub_tasks_do(self):
        """KerasHub's task checks (serialization, predict and fit with and without split preprocessing, a
        `.keras` round trip) on our `T5Gemma2Seq2SeqLM`, built with KerasHub's argument names."""
        tokenizer = T5Gemma2Tokenizer(proto=self.text_only_proto)
        preprocessor = T5Gemma2Seq2SeqLMPreprocessor(
            tokenizer=tokenizer, encoder_sequence_length=24, decoder_sequence_length=16
        )
        backbone_kwargs = {
            **ASYMMETRIC,
            "vocabulary_size": tokenizer.vocabulary_size(),
            "eoi_token_index": tokenizer.vocabulary_size() - 2,
            "image_token_index": tokenizer.vocabulary_size() - 1,
        }
        init_kwargs = {"backbone": T5Gemma2Backbone(**backbone_kwargs), "preprocessor": preprocessor}
        train_data = ({"encoder_text": ENCODER_TEXTS, "decoder_text": DECODER_TEXTS},)
        self.run_task_test(
            cls=T5Gemma2Seq2SeqLM,
            init_kwargs=init_kwargs,
            train_data=train_data,
            expected_output_shape=(2, 16, tokenizer.vocabulary_size()),
        )
        self.run_model_saving_test(
            cls=T5Gemma2Seq2SeqLM,
            init_kwargs={"backbone": T5Gemma2Backbone(**backbone_kwargs)},
            input_data=_inputs(encoder_length=24, decoder_length=16),
        )


# === keras-t5gemma export --format keras-hub ===


def test_command_line_exports_to_keras_hub(tmp_path, capsys):
    from vocabularies import train_vocabulary

    from keras_t5gemma.cli import main as command_line

    tokenizer = T5Gemma2Tokenizer(proto=train_vocabulary(special_pieces=[]))
    backbone = T5Gemma2Backbone(**{**ASYMMETRIC, "vocabulary_size": tokenizer.vocabulary_size(), "dropout_rate": 0.0})
    preprocessor = T5Gemma2Seq2SeqLMPreprocessor(
        tokenizer=tokenizer, encoder_sequence_length=32, decoder_sequence_length=8
    )
    T5Gemma2Seq2SeqLM(backbone, preprocessor).save_to_preset(tmp_path / "ours")
    output = tmp_path / "keras_hub"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = command_line(["export", str(output), "--preset", str(tmp_path / "ours"), "--format", "keras-hub"])
    assert status == 0
    assert "for KerasHub" in capsys.readouterr().out
    ours = T5Gemma2Seq2SeqLM.from_preset(str(tmp_path / "ours"))
    theirs = keras_hub.models.T5Gemma2Seq2SeqLM.from_preset(str(output))
    assert type(theirs.preprocessor).__module__.startswith("keras_hub")
    prompts = ["The quick brown fox", "Numbers like 12345"]
    for model in (ours, theirs):
        model.compile(sampler="greedy")
    assert ours.generate(prompts, max_length=8, stop_token_ids=None) == theirs.generate(
        prompts, max_length=8, stop_token_ids=None
    )
    # A preset with a vision tower exports with it (its logits: tests/test_keras_hub_presets.py).
    arguments = ["export", str(tmp_path / "vision"), "--preset", "t5gemma2_tiny_digits", "--format", "keras-hub"]
    assert command_line(arguments) == 0
    theirs = keras_hub.models.T5Gemma2Seq2SeqLM.from_preset(str(tmp_path / "vision"))
    assert theirs.backbone.vision_encoder is not None and theirs.preprocessor.image_converter is not None
    # --text-only belongs to this format.
    assert command_line(["export", str(tmp_path / "onnx"), "--format", "onnx", "--text-only"]) == 2
    assert "--text-only applies to --format keras-hub" in capsys.readouterr().err
