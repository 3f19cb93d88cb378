"""ONNX Runtime backend: the engine (:mod:`.engine`) and static QDQ quantization as the accuracy
guard's adapter (:mod:`.quantize`)."""

from engine_tools.engines.onnxruntime.engine import OnnxRuntimeEngine

__all__ = ["OnnxRuntimeEngine"]
