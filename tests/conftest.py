import os

# JAX is the default backend; the torch and tensorflow runs set KERAS_BACKEND.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite's models are tiny: XLA's compile time, not the speed of the code it makes, is most of the run
# (a third less with these flags). Child processes inherit them; those that set XLA_FLAGS pass the same two.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# (test file, max abs diff, diff / scale) of every comparison, for `--report-diffs`.
_DIFFERENCES = []


def pytest_addoption(parser):
    parser.addoption(
        "--report-diffs", action="store_true", help="print the largest difference from the reference per test file"
    )


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--report-diffs") or not _DIFFERENCES:
        return
    worst = {}
    for name, difference, relative in _DIFFERENCES:
        if name not in worst or relative > worst[name][1]:
            worst[name] = (difference, relative, worst.get(name, (0, 0, 0))[2] + 1)
        else:
            worst[name] = (*worst[name][:2], worst[name][2] + 1)
    terminalreporter.section("largest differences from the reference")
    for name, (difference, relative, count) in sorted(worst.items()):
        terminalreporter.write_line(
            f"{name}: max abs diff {difference:.2g}, {relative:.2g} of the scale ({count} comparisons)"
        )


def assert_matches_reference(ours, reference, mask=None, atol=1e-4, rtol_to_scale=1e-5):
    """Max abs difference within `atol` and within `rtol_to_scale` of the reference's scale.

    `mask` selects the positions compared (padding positions are free).
    """
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        ours, reference = ours[mask], reference[mask]
    difference = np.abs(ours - reference).max()
    scale = np.abs(reference).max()
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[0]
    _DIFFERENCES.append((test, difference, difference / scale if scale else 0.0))
    assert difference <= atol, f"max abs diff {difference:.3g} > {atol}"
    assert difference <= rtol_to_scale * scale, (
        f"max abs diff {difference:.3g} is {difference / scale:.3g} of the scale {scale:.3g}"
    )
    return difference


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def small_proto():
    from vocabularies import train_vocabulary

    return train_vocabulary()


@pytest.fixture(scope="session")
def gemma3_proto():
    from vocabularies import gemma3_vocabulary

    return gemma3_vocabulary()
