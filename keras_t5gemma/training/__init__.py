"""Training at scale: device meshes, sharded checkpoints, fine-tuning runs, memory estimates.

`keras_t5gemma.training.fine_tune.fine_tune(...)` is what `keras-t5gemma fine-tune` runs.
"""
