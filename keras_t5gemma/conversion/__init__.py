"""Hugging Face checkpoints to keras_t5gemma models."""
