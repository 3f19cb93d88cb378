"""Networks from model cards: PyTorch modules (:mod:`.loaders`) and their FP32 ONNX (:mod:`.export`).

``build_network(card)`` gives an eval-mode ``nn.Module``; ``export_onnx(card)`` the cached ONNX file
every engine is built from. Card formats and their fields are described in :mod:`.loaders`.
"""

from engine_tools.networks.export import (
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    export_key,
    export_onnx,
    validate_onnx,
)
from engine_tools.networks.loaders import (
    InputTransform,
    NetworkError,
    build_network,
    network_formats,
    register_format,
    torch_factory,
)

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
