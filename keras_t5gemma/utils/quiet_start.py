"""The command line's environment: huge pages, JAX when no backend is chosen, TensorFlow's start-up logs hidden.

On Linux with glibc 2.35 or later, the command starts itself again (once,
before anything heavy is imported) with glibc's transparent huge pages for
large allocations (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, a setting glibc
reads only when a process starts). XLA's CPU runtime allocates each step's
temporaries afresh, and each 4 KiB page of them faults on first use: 1.7
million faults per 270m-270m training step, against 90 thousand with huge
pages, and the step ~10% faster (`benchmarks/train_step.py` with
`keras_t5gemma+huge_pages`, BENCHMARKS.md). A `GLIBC_TUNABLES` that already
names the setting (`glibc.malloc.hugetlb=0` turns it off) is left alone.

TensorFlow is imported (by KerasHub's preprocessing) whatever the backend. Its
native libraries log CUDA probing ("Could not find cuda drivers", "failed
call to cuInit") and CPU features while they load, before `absl` logging is
set up, so `TF_CPP_MIN_LOG_LEVEL` does not reach all of them: the command
line loads TensorFlow with the process's stderr pointed at a temporary file,
and prints that file only if loading fails.
"""

import contextlib
import importlib.util
import os
import sys
import tempfile


@contextlib.contextmanager
def native_stderr_held_back():
    """Sends file descriptor 2 to a temporary file; replays it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


HUGE_PAGES = "glibc.malloc.hugetlb"


def _glibc_version():
    """glibc's version as a tuple, or `None` for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def huge_pages_environment(environment, glibc_version):
    """`environment` with glibc's huge pages asked for, or `None` when it has the setting or cannot use it."""
    tunables = environment.get("GLIBC_TUNABLES", "")
    if glibc_version is None or glibc_version < (2, 35) or HUGE_PAGES in tunables:
        return None
    setting = f"{HUGE_PAGES}=1"
    return {**environment, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def restart_with_huge_pages(execute=os.execve):
    """Starts this command again with huge pages (see the module docstring); returns if not needed or not possible."""
    if not sys.platform.startswith("linux"):
        return
    environment = huge_pages_environment(dict(os.environ), _glibc_version())
    arguments = getattr(sys, "orig_argv", None)
    if environment is None or not arguments or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execute(sys.executable, [sys.executable, *arguments[1:]], environment)
    except OSError:
        pass  # Carry on in this process, without huge pages.


def configure_command_line():
    """Huge pages (restarting once), JAX (when `KERAS_BACKEND` is unset and installed), TensorFlow loaded quietly."""
    restart_with_huge_pages()
    if "KERAS_BACKEND" not in os.environ and importlib.util.find_spec("jax") is not None:
        os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if importlib.util.find_spec("tensorflow") is not None:
        with native_stderr_held_back():
            import tensorflow  # noqa: F401
