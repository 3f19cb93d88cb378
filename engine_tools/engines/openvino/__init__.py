"""OpenVINO backend: the engine (:mod:`.engine`), model I/O and kernels (:mod:`.runtime`) and NNCF
quantization as the accuracy guard's adapter (:mod:`.quantize`)."""

from engine_tools.engines.openvino.engine import OpenVINOEngine

__all__ = ["OpenVINOEngine"]
