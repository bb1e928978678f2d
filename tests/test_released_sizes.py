"""Parameter counts of the released sizes, as the preset registry and the README list them.

The 1b and 4b configs are the 270m one (`tests/data/`) with the Gemma 3 1B and 4B
text sizes; `transformers` builds them on PyTorch's meta device (no memory, no
download). That our backbone has `transformers`' count is checked on tiny
configs here and on the real 270m-270m config under `-m slow`
(`python -m pytest -m slow tests/test_released_sizes.py`).
"""

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
from hf_reference import backbone_from_reference
from hf_reference import reference_model
from hf_reference import tiny_config

from keras_t5gemma.models.t5gemma2.t5gemma2_presets import backbone_presets

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import count_parameters  # noqa: E402

# Gemma 3's text sizes; head size 256 and the vision tower as in 270m.
TEXT_SIZES = {
    "t5gemma2_1b_1b": dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1
    ),
    "t5gemma2_4b_4b": dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4
    ),
}


def _released_config(preset):
    config = json.loads((ROOT / "tests/data/t5gemma-2-270m-270m.json").read_text())
    if preset in TEXT_SIZES:
        text = dict(TEXT_SIZES[preset])
        layers = text["num_hidden_layers"]
        text["layer_types"] = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)]
        for stack in (config["encoder"]["text_config"], config["decoder"]):
            stack.update(copy.deepcopy(text))
    return config


@pytest.mark.parametrize("preset", ["t5gemma2_270m_270m", "t5gemma2_1b_1b", "t5gemma2_4b_4b"])
def test_registered_parameter_counts_are_the_reference_counts(preset):
    assert count_parameters.reference_count(_released_config(preset)) == backbone_presets[preset]["params"]


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(),
        tiny_config(
            text={"num_key_value_heads": 1}, decoder={"num_hidden_layers": 2, "layer_types": ["sliding_attention"] * 2}
        ),
    ],
    ids=["balanced", "unbalanced"],
)
def test_our_backbone_has_the_reference_count_of_unique_parameters(config):
    model = reference_model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = backbone_from_reference(model, config, text_only=False)
    assert backbone.count_params() == model.num_parameters()


@pytest.mark.slow
def test_270m_270m_has_the_reference_parameter_count():
    config = _released_config("t5gemma2_270m_270m")
    ours, table, hidden = count_parameters.our_count(config)
    assert ours == count_parameters.reference_count(config) == 786_029_296
    # The figure another Keras port reports: the tied table counted twice and
    # the end-of-image vector left out.
    assert ours + table - hidden == 953_800_816
