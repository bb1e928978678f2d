"""Every private KerasHub name the package uses, imported in this one place.

KerasHub exports its models and layers, but not the helpers its own models are
built with (preset loaders, `classproperty`, the `tf` shim of its
preprocessing). A KerasHub release that moves one of them breaks this module
only. The package pins `keras-hub>=0.32,<0.33`.
"""

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
]
