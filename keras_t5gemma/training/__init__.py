"""Training at scale: device meshes, sharded checkpoints, fine-tuning runs, memory estimates.

`fine_tune(...)` (in `keras_t5gemma.training.fine_tune`) is what `keras-t5gemma fine-tune` runs.
"""

from keras_t5gemma.training.fine_tune import FineTuneInterrupted
from keras_t5gemma.training.fine_tune import FineTuneResult
from keras_t5gemma.training.fine_tune import fine_tune
from keras_t5gemma.training.fine_tune import fine_tune_classifier

__all__ = ["FineTuneInterrupted", "FineTuneResult", "fine_tune", "fine_tune_classifier"]
