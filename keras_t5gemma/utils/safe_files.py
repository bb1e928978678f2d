"""Writes that never leave half a file or folder behind, and never clobber the user's files.

Everything the package writes goes through here: a file or folder is written
beside its destination under a hidden temporary name, then renamed into place
(a rename is atomic within a filesystem). An interruption leaves the old
content, or nothing, at the destination.

Two more faults of real machines are handled here:
- A full disk. HDF5 (Keras' weights files) can take the whole process down
  (SIGSEGV) when a write fails for want of space, before any `except` runs.
  `atomic_folder(..., needed_bytes=N)` therefore checks the free space first
  and raises `OSError(ENOSPC)` naming the folder, the bytes needed and the
  bytes free before anything is written; any other failed write removes the
  temporary folder and leaves the destination as it was.
- Two writers. `writer_lock(path)` takes an OS file lock (`fcntl.flock`) on
  `.NAME.lock` beside the destination for as long as a writer works on it;
  a second process refuses at once (`FolderInUseError`, naming the other
  process's pid and command). The kernel drops the lock when its holder
  exits or is killed, so a killed run never blocks the next one.

Example:
>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> with atomic_file(os.path.join(folder, "notes.txt"), "w") as file:
...     _ = file.write("kept whole")
>>> open(os.path.join(folder, "notes.txt")).read()
'kept whole'
"""

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import threading


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
        _with_usual_permissions(temporary, 0o666)
        with open(descriptor, mode, **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _current_umask():
    """The process's umask, read without changing it where Linux shows it (setting it races other threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _with_usual_permissions(path, mode):
    """`chmod` a temporary file (`0o666`) or folder (`0o777`) to what `open`/`mkdir` would give under the umask.

    `tempfile` makes them private (`0o600`, `0o700`) so that the renamed
    result would be unreadable by the group and others, unlike every other
    file a user writes.
    """
    os.chmod(path, mode & ~_current_umask())


def free_bytes(path):
    """Bytes free to this user on the filesystem that holds (or would hold) `path`."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_free_space(path, needed_bytes, what="output folder"):
    """Raises `OSError(ENOSPC)` unless the filesystem of `path` has `needed_bytes` free.

    Called before a write that a full disk would cut short (or, for HDF5,
    turn into a crash of the process), so that the caller gets an error it
    can catch and nothing is written.
    """
    free = free_bytes(path)
    if needed_bytes > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left for the {what} `{path}`: it needs about {_size(needed_bytes)} and the disk has "
            f"{_size(free)} free. Free some space or choose a folder on another disk; nothing was written",
        )


def _size(count):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024


# === One writer per destination ===


class FolderInUseError(FileExistsError):
    """Another process is writing the destination (it holds its `writer_lock`)."""


# {lock file path: [file descriptor, depth]} of the locks this process holds (a holder may re-enter).
_HELD_LOCKS = {}
_HELD_LOCKS_GUARD = threading.Lock()


def lock_path(path):
    """The lock file of destination `path`: `.NAME.lock` beside it (the folder itself is renamed while written)."""
    folder, name = os.path.split(os.path.realpath(path))
    return os.path.join(folder, f".{name}.lock")


def _holder(lock_file):
    """`pid N (command)` of the process named in `lock_file`, as it wrote itself there."""
    with contextlib.suppress(OSError):
        with open(lock_file, encoding="utf-8", errors="replace") as file:
            text = file.read().strip()
        if text:
            pid, _, command = text.partition(" ")
            return f"pid {pid} ({command})" if command else f"pid {pid}"
    return "another process"


def _refusal(path, what, lock_file):
    return FolderInUseError(
        f"The {what} `{path}` is being written by {_holder(lock_file)}; refusing to write into it at the same "
        "time. Wait for that process to finish (or stop it), or choose another folder."
    )


def check_not_in_use(path, what="output folder"):
    """Raises `FolderInUseError` if another process holds `path`'s `writer_lock`; takes nothing itself."""
    lock_file = lock_path(path)
    if lock_file in _HELD_LOCKS or not os.path.exists(lock_file):
        return
    try:
        descriptor = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(path, what, lock_file) from None
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def writer_lock(path, what="output folder"):
    """Holds an exclusive OS lock on destination `path` for the block; refuses if another process holds it.

    The lock is `fcntl.flock` on `.NAME.lock` beside `path`, which holds the
    holder's pid and command for the refusal message; the file is removed
    when the block ends. The same process may take it again inside the
    block (a `fine_tune` that saves its final model to its `output`).

    Raises:
        FolderInUseError: another process holds the lock (its pid and
            command are named).
    """
    lock_file = lock_path(path)
    with _HELD_LOCKS_GUARD:
        if lock_file in _HELD_LOCKS:
            _HELD_LOCKS[lock_file][1] += 1
        else:
            _HELD_LOCKS[lock_file] = [_acquire(path, what, lock_file), 1]
    try:
        yield
    finally:
        with _HELD_LOCKS_GUARD:
            held = _HELD_LOCKS[lock_file]
            held[1] -= 1
            if not held[1]:
                del _HELD_LOCKS[lock_file]
                # Removed while still locked: a waiter that opened the old file sees it is gone and retries.
                with contextlib.suppress(OSError):
                    os.unlink(lock_file)
                os.close(held[0])


def _acquire(path, what, lock_file):
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    while True:
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise _refusal(path, what, lock_file) from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)  # the previous holder removed this file as it let go: take the new one
    # Who holds it, for the message of a second writer (best effort: an empty file still locks).
    with contextlib.suppress(OSError):
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()} {' '.join(sys.argv)[:500]}\n".encode("utf-8", "replace"))
    return descriptor


def is_empty_folder(path):
    return os.path.isdir(path) and not os.listdir(path)


def check_writable_folder(path, overwrite=False, what="output folder", owns=None):
    """Raises unless `path` may receive a new folder: absent, empty, or `overwrite` given.

    With `owns` (see `atomic_folder`), a folder holding only entries the
    writer owns also passes: the writer may add to it what it lacks.

    Raises:
        FileExistsError: `path` is a file, or a non-empty folder without `overwrite`.
        FolderInUseError: another process is writing `path` (`writer_lock`).
    """
    check_not_in_use(path, what)
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
def atomic_folder(path, owns, overwrite=False, what="output folder", needed_bytes=0):
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
        needed_bytes: int, about how much the content will take: checked
            against the free space before anything is written.

    Raises:
        FileExistsError: `path` is a file, holds entries the writer does
            not own, or (without `overwrite`) entries the new content would
            replace.
        FolderInUseError: another process is writing `path`.
        OSError: `ENOSPC`, fewer than `needed_bytes` free; or any write
            that fails (the temporary folder is removed first).
    """
    with writer_lock(path, what):
        check_writable_folder(path, overwrite, what, owns)
        parent, prefix = _temporary_name(path, "partial")
        os.makedirs(parent, exist_ok=True)
        check_free_space(path, needed_bytes, what)
        temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
        try:
            _with_usual_permissions(temporary, 0o777)
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
