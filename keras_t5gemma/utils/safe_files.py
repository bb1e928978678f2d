"""Writes that never leave half a file or folder behind, and never clobber the user's files.

Everything the package writes goes through here: a file or folder is written
beside its destination under a hidden temporary name, then renamed into place
(a rename is atomic within a filesystem). An interruption leaves the old
content, or nothing, at the destination.

Example:
>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> with atomic_file(os.path.join(folder, "notes.txt"), "w") as file:
...     _ = file.write("kept whole")
>>> open(os.path.join(folder, "notes.txt")).read()
'kept whole'
"""

import contextlib
import os
import shutil
import tempfile


def _temporary_name(path, kind):
    """A hidden name beside `path` (same filesystem, so that the final rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return folder, f".{name}.{kind}-"


@contextlib.contextmanager
def atomic_file(path, mode="wb", overwrite=True, **kwargs):
    """Opens a temporary file beside `path`; renames it to `path` when the block ends without error.

    Args:
        path: the destination file.
        mode: `"w"` or `"wb"` (and `open`'s other arguments in `kwargs`).
        overwrite: if False, refuse an existing `path` (`FileExistsError`).
    """
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"`{path}` exists; refusing to overwrite it.")
    folder, prefix = _temporary_name(path, "partial")
    descriptor, temporary = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        with open(descriptor, mode, **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def is_empty_folder(path):
    return os.path.isdir(path) and not os.listdir(path)


def check_writable_folder(path, overwrite=False, what="output folder", owns=None):
    """Raises unless `path` may receive a new folder: absent, empty, or `overwrite` given.

    With `owns` (see `atomic_folder`), a folder holding only entries the
    writer owns also passes: the writer may add to it what it lacks.

    Raises:
        FileExistsError: `path` is a file, or a non-empty folder without `overwrite`.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"The {what} `{path}` is a file, not a folder.")
    if not os.path.isdir(path) or overwrite:
        return
    names = os.listdir(path)
    if names and (owns is None or not all(owns(name) for name in names)):
        raise FileExistsError(
            f"The {what} `{path}` is not empty; refusing to write into it. Choose a new folder, "
            "or pass `overwrite=True` (`--overwrite` on the command line) to replace what this "
            "package wrote there."
        )


@contextlib.contextmanager
def atomic_folder(path, owns, overwrite=False, what="output folder"):
    """Yields a temporary folder beside `path`; puts it at `path` when the block ends without error.

    `path` must be absent or empty, or hold only entries the writer owns
    (`owns(name)`, e.g. a preset's backbone, to which a tokenizer is added)
    none of which the new content would replace. With `overwrite`, an
    existing `path` is replaced in two renames; from the old folder only the
    owned entries are removed, every other entry is moved into the new
    folder. On an error or an interruption the temporary folder is removed
    and `path` is left as it was.

    Args:
        path: the destination folder.
        owns: callable, whether an entry name (file or folder) is one the
            writer creates.
        overwrite: replace what `path` holds (see above).

    Raises:
        FileExistsError: `path` is a file, holds entries the writer does
            not own, or (without `overwrite`) entries the new content would
            replace.
    """
    check_writable_folder(path, overwrite, what, owns)
    parent, prefix = _temporary_name(path, "partial")
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield temporary
        if overwrite or not os.path.isdir(path) or is_empty_folder(path):
            _move_into_place(temporary, path, owns)
        else:
            _add_into_place(temporary, path, what)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _add_into_place(temporary, path, what):
    """Moves the new entries into `path`, which must hold none of them."""
    names = os.listdir(temporary)
    clashes = sorted(name for name in names if os.path.lexists(os.path.join(path, name)))
    if clashes:
        raise FileExistsError(
            f"The {what} `{path}` already holds {clashes}; refusing to overwrite them. Choose a new "
            "folder, or pass `overwrite=True` (`--overwrite` on the command line) to replace what this "
            "package wrote there."
        )
    for name in names:
        os.rename(os.path.join(temporary, name), os.path.join(path, name))
    os.rmdir(temporary)


def _move_into_place(temporary, path, owns):
    if not os.path.isdir(path):
        os.rename(temporary, path)
        return
    if is_empty_folder(path):
        os.replace(temporary, path)  # POSIX renames onto an empty folder
        return
    parent, prefix = _temporary_name(path, "old")
    previous = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.rmdir(previous)
    os.rename(path, previous)
    os.rename(temporary, path)
    # The user's own files (anything this package does not write) stay.
    for name in os.listdir(previous):
        if not owns(name) and not os.path.exists(os.path.join(path, name)):
            os.rename(os.path.join(previous, name), os.path.join(path, name))
    leftovers = [name for name in os.listdir(previous) if not owns(name)]
    if leftovers:
        raise FileExistsError(f"Kept the previous files {leftovers} in `{previous}`: their names clash.")
    shutil.rmtree(previous)
