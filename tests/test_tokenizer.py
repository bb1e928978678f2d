"""T5Gemma2Tokenizer on a small trained vocabulary, and on the real Gemma 3
vocabulary rebuilt from a GGUF header against the `transformers` Gemma tokenizer."""

import json

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from vocabularies import SMALL_SPECIAL_PIECES
from vocabularies import train_vocabulary

from keras_t5gemma import T5Gemma2Backbone
from keras_t5gemma.conversion.vocabulary import proto_from_tokenizer_json
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import T5Gemma2Tokenizer

ROUND_TRIP_TEXTS = [
    "The quick brown fox.",
    "  two spaces,\ttab and\nnewline  ",
    "naïve café, 日本語 and 🤖 fall back to bytes",
    "<start_of_image><image_soft_token><image_soft_token><end_of_image>",
]


@pytest.fixture
def small_tokenizer(small_proto):
    return T5Gemma2Tokenizer(small_proto, image_placeholder="<image_soft_token>")


def as_lists(token_ids):
    if isinstance(token_ids, tf.RaggedTensor):
        return token_ids.to_list()
    return np.asarray(token_ids).tolist()


def test_special_token_ids(small_tokenizer):
    ids = {
        name: getattr(small_tokenizer, f"{name}_id")
        for name in (
            "pad_token",
            "end_token",
            "start_token",
            "start_of_image_token",
            "end_of_image_token",
            "image_placeholder_token",
        )
    }
    assert ids == {
        "pad_token": 0,
        "end_token": 1,
        "start_token": 2,
        "start_of_image_token": 4,
        "end_of_image_token": 5,
        "image_placeholder_token": 6,
    }
    by_id = T5Gemma2Tokenizer(small_tokenizer.proto, image_placeholder=6)
    assert by_id.image_placeholder_token == "<image_soft_token>"
    assert by_id.image_placeholder_token_id == 6


def test_tokenize_detokenize_round_trip(small_tokenizer):
    for text in ROUND_TRIP_TEXTS:
        token_ids = small_tokenizer(text)
        assert small_tokenizer.detokenize(token_ids) == text
    image_ids = as_lists(small_tokenizer(ROUND_TRIP_TEXTS[-1]))
    assert image_ids == [4, 6, 6, 5]


def test_add_bos_and_eos(small_proto, small_tokenizer):
    tokenizer = T5Gemma2Tokenizer(small_proto, image_placeholder=6, add_bos=True, add_eos=True)
    plain = as_lists(small_tokenizer("The fox."))
    assert as_lists(tokenizer("The fox.")) == [2] + plain + [1]
    # Control pieces are dropped when decoding.
    assert tokenizer.detokenize(tokenizer("The fox.")) == "The fox."


def test_tf_data_map_matches_eager_tokenization(small_proto, small_tokenizer):
    eager = [as_lists(small_tokenizer(text)) for text in ROUND_TRIP_TEXTS]
    ragged = tf.data.Dataset.from_tensor_slices(ROUND_TRIP_TEXTS).batch(2).map(small_tokenizer)
    assert [row for batch in ragged for row in batch.to_list()] == eager

    padded = T5Gemma2Tokenizer(small_proto, image_placeholder=6, sequence_length=12)
    dense = next(iter(tf.data.Dataset.from_tensor_slices(ROUND_TRIP_TEXTS).batch(4).map(padded)))
    assert dense.shape == (4, 12)
    for row, ids in zip(dense.numpy().tolist(), eager):
        assert row == (ids + [0] * 12)[:12]


def test_config_and_assets_round_trip(small_tokenizer, tmp_path):
    config = small_tokenizer.get_config()
    assert config["image_placeholder"] == "<image_soft_token>"
    assert config["proto"] is None
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(small_tokenizer))
    assert type(restored) is T5Gemma2Tokenizer
    assert restored.get_config() == config
    small_tokenizer.save_assets(tmp_path)
    restored.load_assets(tmp_path)
    for text in ROUND_TRIP_TEXTS:
        assert as_lists(restored(text)) == as_lists(small_tokenizer(text))
    assert restored.image_placeholder_token_id == 6


def test_preset_round_trip(small_proto, tmp_path):
    tokenizer = T5Gemma2Tokenizer(small_proto, image_placeholder=6)
    # The preset needs a backbone config for `from_preset` to find the tokenizer class.
    backbone = T5Gemma2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        hidden_dim=32,
        intermediate_dim=48,
        num_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_encoder_layers=1,
        num_decoder_layers=1,
        sliding_window=4,
        eoi_token_id=tokenizer.end_of_image_token_id,
        image_token_id=6,
    )
    backbone.save_to_preset(tmp_path)
    tokenizer.save_to_preset(tmp_path)
    for loader in (T5Gemma2Tokenizer, keras_hub.tokenizers.Tokenizer):
        restored = loader.from_preset(str(tmp_path))
        assert type(restored) is T5Gemma2Tokenizer
        assert restored.image_placeholder_token == "<image_soft_token>"
        assert as_lists(restored(ROUND_TRIP_TEXTS[1])) == as_lists(tokenizer(ROUND_TRIP_TEXTS[1]))


@pytest.mark.parametrize("missing", ["<start_of_image>", "<end_of_image>"])
def test_vocabulary_missing_a_special_piece_is_rejected(missing):
    proto = train_vocabulary([p for p in SMALL_SPECIAL_PIECES if p != missing])
    with pytest.raises(ValueError, match=f"Cannot find special token `'{missing}'`"):
        T5Gemma2Tokenizer(proto, image_placeholder="<image_soft_token>")


def test_bad_image_placeholder_is_rejected(small_proto):
    with pytest.raises(ValueError, match="Cannot find special token `'<not_there>'`"):
        T5Gemma2Tokenizer(small_proto, image_placeholder="<not_there>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        T5Gemma2Tokenizer(small_proto, image_placeholder=256_001)  # the released id needs the full vocabulary
    with pytest.raises(ValueError, match="id \\(int\\), a piece \\(str\\) or None"):
        T5Gemma2Tokenizer(small_proto, image_placeholder=6.0)


def test_tokenizer_json_of_another_model_is_rejected():
    with pytest.raises(ValueError, match="BPE model with byte fallback"):
        proto_from_tokenizer_json({"model": {"type": "Unigram", "vocab": []}})


def test_gguf_without_sentencepiece_vocabulary_is_rejected(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf_vocabulary import proto_from_gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="only SentencePiece vocabularies"):
        proto_from_gguf(path)


# The real Gemma 3 vocabulary, rebuilt from the header of the first part of a GGUF file.

REFERENCE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How's it going?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "\tif (x) {\n\t\treturn y;\n\t}\n",
    "mixed \t tabs\t\t\tand   spaces    here",
    "two  three   eight        thirty-one" + " " * 31 + "forty" + " " * 40 + "end",
    "   leading spaces and trailing   ",
    "line one\nline two\n\nline four\n\n\n\nafter four newlines",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 🤖🎉 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "digits 1234567890, 3.14159, 1e-9, 2025-01-01",
    "Accents: café, naïve, façade, Ærøskøbing, São Paulo, Zürich",
    "Describe <start_of_image> in detail.",
    "<start_of_image><unused99><unused99><unused99><end_of_image>\n\nWhat is this?",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<table><tr><td>cell</td></tr></table> and <code>x = 1</code>",
    "Ünïcödé control\x01chars and non\u00a0breaking space",
    "𝔹𝕠𝕝𝕕 𝕞𝕒𝕥𝕙 and 龘 rare characters",
    "",
    " ",
]


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_proto):
    return T5Gemma2Tokenizer(gemma3_proto)


@pytest.fixture(scope="session")
def reference_tokenizer(gemma3_proto, tmp_path_factory):
    """`transformers`' Gemma tokenizer converted from the rebuilt `tokenizer.model`."""
    from transformers import GemmaTokenizer

    directory = tmp_path_factory.mktemp("gemma3_sentencepiece")
    (directory / "tokenizer.model").write_bytes(gemma3_proto)
    return GemmaTokenizer.from_pretrained(directory)


def test_real_vocabulary_special_ids(gemma3_tokenizer):
    tokenizer = gemma3_tokenizer
    assert tokenizer.vocabulary_size() == 262_144
    assert (tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id) == (0, 1, 2)
    assert tokenizer.start_of_image_token_id == 255_999
    assert tokenizer.end_of_image_token_id == 256_000
    assert tokenizer.image_placeholder_token_id == 256_001
    assert tokenizer.image_placeholder_token == "<unused99>"


def test_real_vocabulary_matches_reference_ids(gemma3_tokenizer, reference_tokenizer):
    expected = [reference_tokenizer(text, add_special_tokens=False)["input_ids"] for text in REFERENCE_TEXTS]
    assert [as_lists(gemma3_tokenizer(text)) for text in REFERENCE_TEXTS] == expected
    in_graph = tf.data.Dataset.from_tensor_slices(REFERENCE_TEXTS).batch(len(REFERENCE_TEXTS))
    assert next(iter(in_graph.map(gemma3_tokenizer))).to_list() == expected


def test_real_vocabulary_detokenizes_like_reference(gemma3_tokenizer, reference_tokenizer):
    for text in REFERENCE_TEXTS:
        token_ids = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert gemma3_tokenizer.detokenize(token_ids) == reference_tokenizer.decode(token_ids) == text


def test_tokenizer_json_gives_the_gguf_vocabulary(gemma3_tokenizer, reference_tokenizer, tmp_path):
    reference_tokenizer.save_pretrained(tmp_path)
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    from_json = T5Gemma2Tokenizer(proto_from_tokenizer_json(tokenizer_json))
    assert from_json.get_vocabulary() == gemma3_tokenizer.get_vocabulary()
    assert [as_lists(from_json(text)) for text in REFERENCE_TEXTS] == [
        as_lists(gemma3_tokenizer(text)) for text in REFERENCE_TEXTS
    ]
