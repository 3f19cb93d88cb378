"""Engine registry: backend name → implementation, imported lazily so missing libraries only matter
when that backend is used."""

from __future__ import annotations

import importlib

from engine_tools.engines.base import METADATA_FILE, PRECISIONS, BuildRequest, Engine, EngineUnavailable

#: backend name → "module:Class". Every class implements :class:`engine_tools.engines.base.Engine`.
BACKENDS: dict[str, str] = {
    "torch": "engine_tools.engines.torch_engine:TorchEngine",
    "openvino": "engine_tools.engines.openvino:OpenVINOEngine",
    "onnxruntime": "engine_tools.engines.onnxruntime:OnnxRuntimeEngine",
    "tensorrt": "engine_tools.engines.tensorrt:TensorRTEngine",
    "torch-compiled": "engine_tools.engines.torch_compiled_engine:TorchCompiledEngine",
}


def engine_class(backend: str) -> type[Engine]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def select_backend(requested: str = "auto") -> tuple[str, str]:
    """Resolve ``auto``: TensorRT when an NVIDIA GPU and ``tensorrt`` are present, else OpenVINO.

    Returns ``(backend, reason)``; the reason is shown to the user.
    """
    if requested != "auto":
        return requested, f"{requested} requested"
    try:
        trt_ok, trt_reason = engine_class("tensorrt").availability()
    except ImportError as exc:  # module itself missing
        trt_ok, trt_reason = False, str(exc)
    if trt_ok:
        return "tensorrt", f"NVIDIA GPU and TensorRT found ({trt_reason})"
    return "openvino", f"TensorRT not usable ({trt_reason}); using OpenVINO on the CPU"


__all__ = [
    "BACKENDS",
    "METADATA_FILE",
    "PRECISIONS",
    "BuildRequest",
    "Engine",
    "EngineUnavailable",
    "engine_class",
    "select_backend",
]
