"""One-off size check of the released 270m-270m config (slow: builds ~0.8B parameters).

Run with `python -m pytest -m slow tests/test_released_sizes.py`.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))


@pytest.mark.slow
def test_270m_270m_has_the_reference_parameter_count():
    import count_parameters

    config = json.loads((ROOT / "tests/data/t5gemma-2-270m-270m.json").read_text())
    ours, table, hidden = count_parameters.our_count(config)
    assert ours == count_parameters.reference_count(config) == 786_029_296
    # The figure another Keras port reports: the tied table counted twice and
    # the end-of-image vector left out.
    assert ours + table - hidden == 953_800_816
