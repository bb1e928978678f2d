"""Serve a T5Gemma ONNX export (T5Gemma 2 or the first family) with numpy, onnxruntime and sentencepiece only.

The export comes from `keras_t5gemma.export.export_onnx` (or `keras-t5gemma
export OUTPUT --format onnx`). This package imports neither Keras, JAX,
TensorFlow nor torch, so it runs where the training stack is not installed.
"""

from t5gemma_onnx.runtime import PRECISIONS
from t5gemma_onnx.runtime import OnnxSeq2SeqLM
from t5gemma_onnx.runtime import available_precisions
from t5gemma_onnx.runtime import convert_image
from t5gemma_onnx.runtime import sample

__all__ = ["PRECISIONS", "OnnxSeq2SeqLM", "available_precisions", "convert_image", "sample"]
