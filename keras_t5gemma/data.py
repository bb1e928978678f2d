"""Data files: training data and prompts read from JSONL, CSV, text and image files; vectors written.

Plain file reading (the standard library, numpy and Pillow); nothing here knows
a model. Every reader raises `ValueError` naming the file, and the line for a
bad record, so that a caller can show one clear message. Writes are atomic
(`utils.safe_files`).

Example:
```python
import json
import tempfile

folder = tempfile.mkdtemp()
path = f"{folder}/pairs.jsonl"
with open(path, "w") as file:
    file.write(json.dumps({"input": "rotate: 1 2 3", "target": "2 3 1"}) + "\\n")
assert read_pairs(path) == [("rotate: 1 2 3", "2 3 1", None)]
```
"""

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from keras_t5gemma.utils.safe_files import atomic_file


def _check_file(path, what="file"):
    if not os.path.isfile(path):
        raise ValueError(f"no such {what}: {path}")


# The encoding of data and prompt files unless the caller names another (`--encoding`).
DEFAULT_ENCODING = "utf-8"


def _text_lines(path, newline=None, encoding=DEFAULT_ENCODING):
    """The lines of a text file, line ends kept (`newline` as `open` takes it).

    A UTF-8 byte-order mark (what Excel's "CSV UTF-8" and Notepad write) is
    dropped. A byte that is not text in `encoding` is named with its line
    and column in bytes.
    """
    _check_file(path)
    encoding = _codec(encoding)
    with open(path, "rb") as file:
        data = file.read()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}, byte {column}: not {error.encoding} text (byte 0x{data[error.start]:02x}: "
            f"{error.reason}); give the file's encoding with --encoding (`encoding=`), e.g. latin-1 or cp1252"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    # Split as `open(path, newline=newline)` would.
    return list(io.StringIO(text, newline=newline))


def _codec(encoding):
    """The Python codec of `encoding`, checked; `utf-8-sig` and `utf-8` read the same here."""
    import codecs

    try:
        return codecs.lookup(encoding or DEFAULT_ENCODING).name
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (try utf-8, latin-1, cp1252, utf-16)") from None


def _json_records(path, encoding=DEFAULT_ENCODING):
    """`(where, record)` for each non-blank line of a JSONL file; `where` is `"PATH, line N"`."""
    for number, line in enumerate(_text_lines(path, encoding=encoding), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None


def read_lines(path, encoding=DEFAULT_ENCODING):
    """The non-blank lines of a text file (prompts or texts, one per line), without their line ends.

    `encoding` is the file's (a UTF-8 byte-order mark is dropped).
    """
    return [line.rstrip("\r\n") for line in _text_lines(path, encoding=encoding) if line.strip()]


def read_image(path):
    """The image file at `path` (PNG, JPEG, ...), decoded: a PIL image whose pixels are read.

    Raises:
        ValueError: for a missing, unreadable or too large (decompression bomb) file.
    """
    from PIL import Image
    from PIL import UnidentifiedImageError

    _check_file(path, "image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Image.DecompressionBombError as error:
        raise ValueError(f"the image {path} is too large to read safely ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read the image {path}: {error}") from None


def read_pairs(path, image_marker=None, encoding=DEFAULT_ENCODING):
    """`[(input, target, image path or None)]` from a JSONL or CSV file.

    JSONL: one object per line with string fields `input` and `target`
    (optionally `image`, a path relative to the data file); blank lines are
    skipped. CSV: a header naming the columns `input` and `target` (and
    optionally `image`). An image outside the data file's folder is read, with
    a warning on standard error.

    Args:
        path: str, a `.jsonl` or `.csv` file.
        image_marker: str or None, the prompt's image marker (`<start_of_image>`):
            a record whose input holds it must have an `image`.
        encoding: str, the file's text encoding (a UTF-8 byte-order mark is
            dropped).

    Raises:
        ValueError: naming the file and line of the first bad record (or
            byte that is not text in `encoding`).
    """
    _check_file(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{path}: expected a .jsonl or .csv file")
    folder = os.path.dirname(os.path.abspath(path))
    if suffix == ".jsonl":
        pairs = [_pair(record, where, folder, image_marker) for where, record in _json_records(path, encoding)]
    else:
        reader = csv.DictReader(_text_lines(path, newline="", encoding=encoding))
        _check_csv_header(path, reader.fieldnames)
        pairs = [_pair(record, f"{path}, line {reader.line_num}", folder, image_marker) for record in reader]
    if not pairs:
        raise ValueError(f"{path}: no examples")
    return pairs


def _pair(record, where, folder, image_marker):
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with `input` and `target`")
    for key in ("input", "target"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: `{key}` must be a string; got {record.get(key)!r}")
    image = record.get("image") or None
    if image is not None:
        if not isinstance(image, str):
            raise ValueError(f"{where}: `image` must be a file path; got {image!r}")
        image = os.path.join(folder, image)
        if not os.path.isfile(image):
            raise ValueError(f"{where}: no such image file: {image}")
        inside = os.path.realpath(folder)
        if os.path.commonpath([inside, os.path.realpath(image)]) != inside:
            print(
                f"keras-t5gemma: warning: {where}: the image {image} is outside the data file's folder", file=sys.stderr
            )
    elif image_marker and image_marker in record["input"]:
        raise ValueError(f"{where}: `input` has a {image_marker} marker but the record has no `image`")
    return record["input"], record["target"], image


def check_pairs(pairs, image_marker=None):
    """In-memory examples as `read_pairs` gives them: `[(input, target, image or None)]`.

    Each example is an `(input, target)` or `(input, target, image)` tuple,
    an image being a file path (checked to exist), a PIL image or `(H, W, 3)`
    pixels; an input holding `image_marker` needs its image.

    Raises:
        ValueError: naming the example that is wrong, or for no examples.
    """
    examples = []
    for number, pair in enumerate(pairs):
        where = f"the data's example {number}"
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            raise ValueError(f"{where}: expected an (input, target) or (input, target, image) tuple; got {pair!r}")
        text, target, image = (*pair, None)[:3]
        if not isinstance(text, str) or not isinstance(target, str):
            raise ValueError(f"{where}: the input and the target must be strings; got {text!r}, {target!r}")
        if image is None and image_marker is not None and image_marker in text:
            raise ValueError(f"{where}: the input has a {image_marker} marker but the example has no image")
        if isinstance(image, (str, os.PathLike)):
            image = os.fspath(image)
            if not os.path.isfile(image):
                raise ValueError(f"{where}: no such image file: {image}")
        examples.append((text, target, image))
    if not examples:
        raise ValueError("the data has no examples")
    return examples


def read_labelled(path, per_word=False, encoding=DEFAULT_ENCODING):
    """`(texts, labels, names)` from a JSONL file of labelled inputs.

    Lines are `{"input": str, "label": class}`, or with `per_word`
    `{"input": str, "labels": [class per whitespace-separated word]}`; a class
    is an index or a name; `encoding` is the file's. See `number_classes`
    for what is returned.

    Raises:
        ValueError: naming the file and line of the first bad record.
    """
    _check_file(path)
    if Path(path).suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: classification data must be a .jsonl file")
    key = "labels" if per_word else "label"
    examples = []
    for where, record in _json_records(path, encoding):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with a string `input`")
        examples.append((where, record.get("input"), record.get(key)))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return number_classes(examples, per_word, source=path)


def number_classes(examples, per_word=False, source="the data"):
    """`(texts, labels, names)` of labelled examples, each label checked.

    Args:
        examples: `(where, text, label)` triples; `where` names the example in
            errors (`"data.jsonl, line 3"`). A label is a class index or name,
            or with `per_word` a list of them, one per whitespace-separated word.
        per_word: bool, one label per word (token classification).
        source: str, the examples' origin, named in errors about them all.

    Returns:
        The texts; the labels as class indices (lists of them with
        `per_word`); and the class names numbered in order of first appearance,
        or `None` when the labels were indices already.
    """
    key = "labels" if per_word else "label"
    texts, labels = [], []
    for where, text, label in examples:
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected an object with a string `input`")
        if per_word:
            words = len(text.split())
            if not isinstance(label, list) or len(label) != words:
                raise ValueError(f"{where}: `labels` must be a list of {words} classes, one per word")
        for value in label if per_word else [label]:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 0):
                raise ValueError(f"{where}: `{key}` must hold class indices or names; got {value!r}")
        texts.append(text)
        labels.append(label)
    flat = [value for label in labels for value in (label if per_word else [label])]
    if all(isinstance(value, int) for value in flat):
        return texts, labels, None
    if any(isinstance(value, int) for value in flat):
        raise ValueError(f"{source}: labels mix class indices and names; use one or the other")
    names = list(dict.fromkeys(flat))
    index = {name: i for i, name in enumerate(names)}
    if per_word:
        return texts, [[index[value] for value in label] for label in labels], names
    return texts, [index[label] for label in labels], names


# The files `write_vectors` writes, by suffix.
VECTOR_FORMATS = (".npy", ".jsonl")


def check_vectors_file(path, overwrite=False):
    """Raises what `write_vectors(path, ...)` would, before any vector is computed."""
    if Path(path).suffix.lower() not in VECTOR_FORMATS:
        raise ValueError(f"a vectors file must end in {' or '.join(VECTOR_FORMATS)}; got {path}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")


def write_vectors(path, texts, vectors, overwrite=False):
    """Writes one vector per text: `.npy` (a `(texts, size)` float32 array) or `.jsonl` (`{"text", "embedding"}`).

    Raises:
        ValueError: for another suffix.
        FileExistsError: `path` exists and `overwrite` is False.
    """
    check_vectors_file(path, overwrite)
    vectors = np.asarray(vectors, "float32")
    if Path(path).suffix.lower() == ".npy":
        with atomic_file(path, "wb", overwrite=overwrite) as file:
            np.save(file, vectors)
        return
    with atomic_file(path, "w", overwrite=overwrite, encoding="utf-8") as file:
        file.writelines(json.dumps({"text": t, "embedding": v.tolist()}) + "\n" for t, v in zip(texts, vectors))


# === Streamed reading (`keras_t5gemma.training.input_pipeline`) ===

# The files of input/target pairs that can be read as a stream.
STREAM_SUFFIXES = (".jsonl", ".csv", ".parquet")
# The files of raw text (continued pretraining): one document per line of a `.txt`, or JSONL `{"text": ...}`.
TEXT_SUFFIXES = (".txt", ".jsonl")
PARQUET_EXTRA = "pip install 'keras-t5gemma[parquet]'"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ImportError(f"reading Parquet files needs pyarrow: {PARQUET_EXTRA}") from None
    return parquet


def _streamed_lines(path, newline=None, encoding=DEFAULT_ENCODING, block_size=1 << 18):
    """The lines of a text file as `_text_lines` splits them, decoded a block at a time (never all in memory).

    A byte that is not text in `encoding` is named with its line and column,
    counted as `_text_lines` counts them.
    """
    import codecs
    import re

    _check_file(path)
    decoder = codecs.getincrementaldecoder(_codec(encoding))()
    line_end = re.compile(r"\r\n|\r|\n")
    pending, fed, first = "", 0, True
    with open(path, "rb") as file:
        while True:
            block = file.read(block_size)
            try:
                held = len(decoder.getstate()[0])
                pending += decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                _raise_not_text(path, fed - held + error.start, error)
            fed += len(block)
            if first and pending:
                pending, first = pending.removeprefix("\ufeff"), False
            start = 0
            for match in line_end.finditer(pending):
                # A "\r" at the end of a block may be the first half of "\r\n": wait for the next block.
                if block and match.end() == len(pending) and match.group() == "\r":
                    break
                line = pending[start : match.end()]
                yield line if newline is not None else line[: match.start() - start] + "\n"
                start = match.end()
            pending = pending[start:]
            if not block:
                break
    if pending:
        yield pending


def _raise_not_text(path, offset, error):
    """The error of `_text_lines` for the byte at `offset`, its line counted by reading the file up to it."""
    line, column, read = 1, offset + 1, 0
    with open(path, "rb") as file:
        while read < offset:
            block = file.read(min(1 << 20, offset - read))
            newlines = block.count(b"\n")
            if newlines:
                line += newlines
                column = offset - (read + block.rfind(b"\n") + 1) + 1
            read += len(block)
        file.seek(offset)
        byte = file.read(1)[0]
    raise ValueError(
        f"{path}, line {line}, byte {column}: not {error.encoding} text (byte 0x{byte:02x}: {error.reason}); "
        "give the file's encoding with --encoding (`encoding=`), e.g. latin-1 or cp1252"
    ) from None


def stream_records(path, encoding=DEFAULT_ENCODING, start=0):
    """`(where, record)` for the records of a `.jsonl`, `.csv`, `.parquet` or `.txt` file from record `start`, read
    lazily.

    A `.txt` record is a non-blank line without its line end. A JSONL record
    is its line, unparsed (`pair_of_record` parses it): a
    reader that skips other processes' records does not parse them. A CSV
    record is a dict of its columns, a Parquet record a dict of its
    `input`/`target`/`image` columns. `where` is `"PATH, line N"` (`"PATH, row
    N"` for Parquet). Records before `start` are skipped, unparsed where the
    format allows (Parquet skips whole row groups).

    Raises:
        ValueError: another suffix, a CSV header without `input` and
            `target`, bytes that are not text in `encoding`.
        ImportError: a Parquet file without pyarrow (naming the extra).
    """
    _check_file(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (*STREAM_SUFFIXES, ".txt"):
        raise ValueError(f"{path}: expected a {', '.join(STREAM_SUFFIXES)} or .txt file")
    if suffix == ".parquet":
        yield from _parquet_records(path, start)
        return
    number = 0
    if suffix in (".jsonl", ".txt"):
        for line_number, line in enumerate(_streamed_lines(path, encoding=encoding), 1):
            if line.strip():
                if number >= start:
                    yield f"{path}, line {line_number}", line if suffix == ".jsonl" else line.rstrip("\r\n")
                number += 1
        return
    reader = csv.DictReader(_streamed_lines(path, newline="", encoding=encoding))
    _check_csv_header(path, reader.fieldnames)
    for record in reader:
        if number >= start:
            yield f"{path}, line {reader.line_num}", record
        number += 1


def _check_csv_header(path, header):
    header = header or []
    if "input" not in header or "target" not in header:
        raise ValueError(
            f"{path}: the CSV header must name the columns `input` and `target` "
            f"(and optionally `image`); found {header}"
        )


def _parquet_records(path, start):
    parquet = _pyarrow_parquet()
    try:
        file = parquet.ParquetFile(path)
    except Exception as error:
        raise ValueError(f"cannot read the Parquet file {path}: {error}") from None
    names = file.schema_arrow.names
    if "input" not in names or "target" not in names:
        raise ValueError(f"{path}: the Parquet file must have the columns `input` and `target`; found {names}")
    columns = [name for name in ("input", "target", "image") if name in names]
    row = 0
    for group in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if row + rows <= start:
            row += rows
            continue
        for batch in file.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
            for record in batch.to_pylist():
                if row >= start:
                    yield f"{path}, row {row + 1}", record
                row += 1


def count_records(path, encoding=DEFAULT_ENCODING):
    """The records `stream_records(path)` yields, counted without parsing JSON (Parquet: from its metadata)."""
    if Path(path).suffix.lower() == ".parquet":
        _check_file(path)
        return _pyarrow_parquet().ParquetFile(path).metadata.num_rows
    return sum(1 for _ in stream_records(path, encoding))


def pair_of_record(record, where, folder=None, image_marker=None):
    """`(input, target, image or None)` of a `stream_records` record, checked as `read_pairs` checks its records.

    `folder` is the data file's (where relative image paths start).
    """
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    return _pair(record, where, folder or ".", image_marker)
