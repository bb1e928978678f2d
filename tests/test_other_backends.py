"""The parity smoke subset re-run on the torch and tensorflow Keras backends.

Keras picks its backend once per process, so each backend runs in a child
pytest process.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_parity_smoke_on_backend(backend):
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("launched from the JAX run only")
    environment = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "backend_smoke", "-p", "no:cacheprovider", str(TESTS)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed", summary), summary
