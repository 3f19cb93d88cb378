"""MedQuantSlicer engine tools: the Slicer-free core.

Real post-training INT8 quantization of pretrained 3D medical segmentation networks, with
OpenVINO, ONNX Runtime, TensorRT and a PyTorch FP32 reference behind one engine interface.
Importing this package sends nothing over the network (see :mod:`engine_tools.privacy`).
"""

from engine_tools import privacy as _privacy

_privacy.disable_telemetry()

__version__ = "0.1.0"
