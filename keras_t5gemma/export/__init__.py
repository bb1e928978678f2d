"""Exports of T5Gemma 2 models for serving without the training stack."""

from keras_t5gemma.export.onnx import export_onnx

__all__ = ["export_onnx"]
