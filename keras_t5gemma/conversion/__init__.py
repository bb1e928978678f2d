"""Hugging Face checkpoints to keras_t5gemma models and back.

Importing this package registers the T5Gemma 2 and T5Gemma (first generation) checkpoint loaders, through
which every class's `from_preset` converts `hf://` handles and local
Hugging Face folders, the loader of KerasHub's own T5Gemma 2 presets, and
the "transformers" exporter behind every class's
`export_to_transformers` and the "keras-hub" one behind `export_to_keras_hub`.
Conversion imports the models; the models never import conversion.
"""

from keras_t5gemma.conversion.keras_hub_export import export_to_keras_hub
from keras_t5gemma.conversion.keras_hub_preset import REGISTERED_NAME as KERAS_HUB_T5GEMMA2
from keras_t5gemma.conversion.keras_hub_preset import KerasHubT5Gemma2PresetLoader
from keras_t5gemma.conversion.preset_loader import T5Gemma2CheckpointLoader
from keras_t5gemma.conversion.t5gemma_loader import T5GemmaCheckpointLoader
from keras_t5gemma.conversion.transformers_export import export_to_transformers
from keras_t5gemma.utils.preset_utils import register_checkpoint_loader
from keras_t5gemma.utils.preset_utils import register_exporter
from keras_t5gemma.utils.preset_utils import register_foreign_preset_loader

register_checkpoint_loader("t5gemma2", T5Gemma2CheckpointLoader)
register_checkpoint_loader("t5gemma", T5GemmaCheckpointLoader)
register_foreign_preset_loader(KERAS_HUB_T5GEMMA2, KerasHubT5Gemma2PresetLoader)
register_exporter("transformers", export_to_transformers)
register_exporter("keras-hub", export_to_keras_hub)
