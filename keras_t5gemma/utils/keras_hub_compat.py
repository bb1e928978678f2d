"""Every private KerasHub name the package uses, imported in this one place (and Keras' one).

KerasHub exports its models and layers, but not the helpers its own models are
built with (preset loaders, `classproperty`, the `tf` shim of its
preprocessing). A KerasHub release that moves one of them breaks this module
only. The package pins `keras-hub>=0.32,<0.33`. Keras' private list of
variables waiting for values is used by `variables_without_values` only.
"""

import contextlib

import keras
from keras.src.backend.common import global_state
from keras_hub.src.utils.pipeline_model import PipelineModel
from keras_hub.src.utils.preset_utils import KerasPresetLoader
from keras_hub.src.utils.preset_utils import PresetLoader
from keras_hub.src.utils.preset_utils import check_config_class
from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import get_file
from keras_hub.src.utils.preset_utils import load_json
from keras_hub.src.utils.python_utils import classproperty
from keras_hub.src.utils.tensor_utils import any_equal
from keras_hub.src.utils.tensor_utils import in_grain_data_pipeline
from keras_hub.src.utils.tensor_utils import in_tf_function
from keras_hub.src.utils.tensor_utils import preprocessing_function
from keras_hub.src.utils.tensor_utils import tf


@contextlib.contextmanager
def variables_without_values():
    """A scope whose new Keras variables get paths, shapes and dtypes but never values.

    Keras' `StatelessScope(initialize_variables=False)` leaves them
    unallocated but registered, and the next top-level stateless scope (any
    `predict` or `generate`) would initialize them all; leaving this scope
    drops them from that list. Use such variables for their metadata only.
    """
    waiting = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute("uninitialized_variables", waiting)


__all__ = [
    "KerasPresetLoader",
    "PipelineModel",
    "PresetLoader",
    "any_equal",
    "check_config_class",
    "check_file_exists",
    "classproperty",
    "get_file",
    "in_grain_data_pipeline",
    "in_tf_function",
    "load_json",
    "preprocessing_function",
    "tf",
    "variables_without_values",
]
