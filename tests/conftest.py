import os

# JAX is the default backend; the torch and tensorflow runs set KERAS_BACKEND.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
