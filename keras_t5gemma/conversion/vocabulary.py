"""Gemma 3 SentencePiece vocabularies rebuilt from other serialisations.

Gemma checkpoints do not always ship a SentencePiece `tokenizer.model`:
T5Gemma 2 repositories carry a Hugging Face `tokenizer.json`, which is turned
back into a serialized SentencePiece `ModelProto` that `T5Gemma2Tokenizer`
(and `tensorflow-text`) can run. (The tests rebuild the real Gemma 3
vocabulary from a GGUF header the same way: `tests/gguf_vocabulary.py`.)

The settings that make SentencePiece segment like Gemma 3:
- a BPE model: the adjacent pair whose concatenation has the highest score
  merges first, and characters outside the vocabulary fall back to
  `<0xNN>` byte pieces;
- no normaliser rules, no dummy prefix, no collapsing of spaces: every space
  becomes `▁` and nothing else changes, so indentation, runs of spaces and
  newlines are kept;
- `<pad>`, `<eos>` and `<bos>` are control pieces (never produced from text,
  dropped when decoding) and `<unk>` is the unknown piece;
- every other special piece (`<start_of_image>`, `<start_of_turn>`,
  `<unusedN>`, runs of newlines or tabs, HTML tags) is user-defined: found
  whole in the text, as Hugging Face finds its added tokens;
- except runs of spaces (`▁▁` to 31 `▁`): Hugging Face matches added tokens
  against the raw text, where spaces are still spaces, so it never finds
  them there and builds them by BPE merges that come before every other
  merge. They are ordinary pieces here, scored above all others in id
  order, so that SentencePiece builds them the same way (as user-defined
  pieces, a run of 40 spaces would split 31 + 9 instead of 16 + 24).
"""

import base64
import re

from sentencepiece import sentencepiece_model_pb2

_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
NORMAL = _PIECE.NORMAL
UNKNOWN = _PIECE.UNKNOWN
CONTROL = _PIECE.CONTROL
USER_DEFINED = _PIECE.USER_DEFINED
UNUSED = _PIECE.UNUSED
BYTE = _PIECE.BYTE

PAD_PIECE = "<pad>"
EOS_PIECE = "<eos>"
BOS_PIECE = "<bos>"
UNK_PIECE = "<unk>"
CONTROL_PIECES = (PAD_PIECE, EOS_PIECE, BOS_PIECE)

# SentencePiece writes a space as U+2581 inside pieces.
SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def build_proto(pieces, scores, piece_types):
    """Serialized SentencePiece `ModelProto` that segments like Gemma 3.

    Args:
        pieces: list of str, the piece of each id.
        scores: list of float, the BPE score of each piece (higher merges
            first); only `NORMAL` pieces' scores matter.
        piece_types: list of int, `NORMAL`, `UNKNOWN`, `CONTROL`,
            `USER_DEFINED`, `UNUSED` or `BYTE` for each piece.

    Returns:
        bytes.
    """
    if not len(pieces) == len(scores) == len(piece_types):
        raise ValueError(
            f"Got {len(pieces)} pieces, {len(scores)} scores and {len(piece_types)} types; expected one of each per id."
        )
    unknown_ids = [i for i, piece_type in enumerate(piece_types) if piece_type == UNKNOWN]
    if len(unknown_ids) != 1:
        raise ValueError(f"A SentencePiece vocabulary needs exactly one unknown piece, got ids {unknown_ids}.")
    if len(set(pieces)) != len(pieces):
        raise ValueError("The vocabulary has duplicate pieces.")
    ids = {piece: i for i, piece in enumerate(pieces)}

    proto = sentencepiece_model_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    # How Gemma 3's vocabulary was trained; SentencePiece reads none of these
    # when encoding, they are kept for anyone retraining from this proto.
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.treat_whitespace_as_suffix = False
    trainer.unk_id = unknown_ids[0]
    trainer.unk_piece = pieces[unknown_ids[0]]
    for name, piece in (("pad", PAD_PIECE), ("eos", EOS_PIECE), ("bos", BOS_PIECE)):
        setattr(trainer, f"{name}_id", ids.get(piece, -1))
        setattr(trainer, f"{name}_piece", piece)

    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = False
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = True

    for piece, score, piece_type in zip(pieces, scores, piece_types):
        proto.pieces.add(piece=piece, score=float(score), type=int(piece_type))
    return proto.SerializeToString()


def is_space_run(piece):
    return len(piece) > 1 and set(piece) == {SPACE}


def special_piece_type(piece, unk_piece):
    """Type of a piece the source marks special (added, control or user-defined)."""
    if piece == unk_piece:
        return UNKNOWN
    if piece in CONTROL_PIECES:
        return CONTROL
    if is_space_run(piece):
        return NORMAL
    return USER_DEFINED


def proto_from_tokenizer_json(tokenizer_json):
    """Gemma 3 SentencePiece proto from a Hugging Face `tokenizer.json`.

    For checkpoints that ship no `tokenizer.model`. The BPE merges become
    scores (a piece made by an earlier merge scores higher), so SentencePiece
    merges in the order the merges list; added tokens keep their ids.

    Args:
        tokenizer_json: dict, the parsed `tokenizer.json` of a Gemma
            tokenizer (a byte-fallback BPE model).

    Returns:
        bytes, a serialized SentencePiece `ModelProto`.

    Example:
    ```python
    with open("tokenizer.json") as file:
        proto = proto_from_tokenizer_json(json.load(file))
    tokenizer = T5Gemma2Tokenizer(proto)
    ```
    """
    model = tokenizer_json["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(
            "Expected the `tokenizer.json` of a Gemma tokenizer (a BPE model with byte fallback), "
            f"got a `{model.get('type')}` model with byte_fallback={model.get('byte_fallback')}."
        )
    pieces_by_id = {index: piece for piece, index in model["vocab"].items()}
    added_by_id = {token["id"]: token["content"] for token in tokenizer_json.get("added_tokens", [])}
    pieces_by_id.update(added_by_id)
    size = max(pieces_by_id) + 1
    missing = sorted(set(range(size)) - set(pieces_by_id))
    if missing:
        raise ValueError(f"The vocabulary has no piece for ids {missing[:10]}.")
    pieces = [pieces_by_id[i] for i in range(size)]

    merges = model.get("merges", [])
    merged_rank = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged_rank.setdefault(left + right, rank)
    unk_piece = model.get("unk_token") or UNK_PIECE

    scores, piece_types = [], []
    for i, piece in enumerate(pieces):
        if _BYTE_PIECE.fullmatch(piece):
            piece_type = BYTE
        elif i in added_by_id or piece == unk_piece:
            piece_type = special_piece_type(piece, unk_piece)
        else:
            piece_type = NORMAL
        piece_types.append(piece_type)
        if piece_type == NORMAL:
            # Pieces no merge makes (single characters) score below every merge.
            scores.append(-float(merged_rank.get(piece, len(merges))))
        else:
            scores.append(0.0)
    return build_proto(pieces, scores, piece_types)


def train_vocabulary(texts, vocab_size, special_pieces, **options):
    """A new byte-fallback BPE vocabulary with Gemma's special ids, trained on `texts`.

    pad 0, eos 1, bos 2 and unk 3 as in Gemma 3; `special_pieces` (for
    example the image markers) become user-defined pieces. `options` are
    further `SentencePieceTrainer` settings. Returns the serialized proto.
    """
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
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
        user_defined_symbols=list(special_pieces),
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def _normalizer(spec):
    """The `tokenizer.json` normaliser for a SentencePiece `normalizer_spec`.

    Gemma 3's is the identity; vocabularies trained with SentencePiece's
    defaults (as the bundled demo's) also apply its NFKC character map and
    collapse runs of spaces. Spaces become `▁` in the pre-tokenizer, which
    also adds the dummy prefix.
    """
    steps = []
    if spec.precompiled_charsmap:
        steps.append(
            {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()}
        )
    if spec.remove_extra_whitespaces:
        # SentencePiece also strips the text's ends; a normaliser cannot, as it sees the text in pieces
        # between added tokens, so a leading or trailing space stays (one `▁`).
        steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    return {"type": "Sequence", "normalizers": steps} if steps else None


def tokenizer_json_from_proto(proto, add_bos=True, add_eos=False):
    """A Hugging Face `tokenizer.json` (dict) that segments like the Gemma 3 SentencePiece `proto`.

    The inverse of `proto_from_tokenizer_json`. SentencePiece's BPE joins the
    adjacent pair whose concatenation scores highest; a BPE merge list ranked
    by that score, with every split of a piece into two pieces, makes the
    same choices. Control, unknown and user-defined pieces become added
    tokens (matched whole in the raw text); byte pieces serve the byte
    fallback.

    Args:
        proto: bytes, a serialized SentencePiece `ModelProto` (BPE, byte
            fallback), e.g. `T5Gemma2Tokenizer.proto`.
        add_bos, add_eos: whether encoding a text adds `<bos>` / `<eos>`.

    Returns:
        dict, to be written as JSON.
    """
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    if model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or not model.trainer_spec.byte_fallback:
        raise ValueError("Only byte-fallback BPE SentencePiece vocabularies (as Gemma 3's) can be exported.")
    pieces = [piece.piece for piece in model.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {
        piece.piece: piece.score
        for piece in model.pieces
        if piece.type == NORMAL and not _BYTE_PIECE.fullmatch(piece.piece)
    }
    merges = []
    for piece, score in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, vocab[piece], cut, [left, right]))
    merges.sort(key=lambda merge: merge[:3])
    added_tokens = []
    for i, piece in enumerate(model.pieces):
        if piece.type in (CONTROL, UNKNOWN, USER_DEFINED):
            added_tokens.append(
                {
                    "id": i,
                    "content": piece.piece,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": piece.type != USER_DEFINED,
                }
            )
    unk_piece = model.trainer_spec.unk_piece or UNK_PIECE

    def template(sequence_id, type_id):
        items = [{"Sequence": {"id": sequence_id, "type_id": type_id}}]
        if add_bos:
            items.insert(0, {"SpecialToken": {"id": BOS_PIECE, "type_id": type_id}})
        if add_eos:
            items.append({"SpecialToken": {"id": EOS_PIECE, "type_id": type_id}})
        return items

    special_tokens = {
        piece: {"id": piece, "ids": [vocab[piece]], "tokens": [piece]}
        for piece, wanted in ((BOS_PIECE, add_bos), (EOS_PIECE, add_eos))
        if wanted
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": _normalizer(model.normalizer_spec),
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": SPACE,
            "prepend_scheme": "first" if model.normalizer_spec.add_dummy_prefix else "never",
            "split": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": template("A", 0),
            "pair": template("A", 0) + template("B", 1),
            "special_tokens": special_tokens,
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                *(
                    [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                    if model.normalizer_spec.add_dummy_prefix
                    else []
                ),
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk_piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [merge[3] for merge in merges],
        },
    }
