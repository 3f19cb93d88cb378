"""Networks from model cards: PyTorch modules (:mod:`.loaders`) and their FP32 ONNX (:mod:`.export`).

``build_network(card)`` gives an eval-mode ``nn.Module``; ``export_onnx(card)`` the cached ONNX file
every engine is built from. Card formats and their fields are described in :mod:`.loaders`.
"""

import importlib
from typing import Any

#: public name -> the submodule defining it; loaded on first use, so that finding a cached export
#: (``export_onnx``) does not import PyTorch (the loaders need it)
_HOMES = {
    "INPUT_NAME": "export",
    "ONNX_OPSET": "export",
    "OUTPUT_NAME": "export",
    "export_key": "export",
    "export_onnx": "export",
    "validate_onnx": "export",
    "NetworkError": "files",
    "InputTransform": "loaders",
    "build_network": "loaders",
    "network_formats": "loaders",
    "register_format": "loaders",
    "torch_factory": "loaders",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = [
    "INPUT_NAME",
    "ONNX_OPSET",
    "OUTPUT_NAME",
    "InputTransform",
    "NetworkError",
    "build_network",
    "export_key",
    "export_onnx",
    "network_formats",
    "register_format",
    "torch_factory",
    "validate_onnx",
]
