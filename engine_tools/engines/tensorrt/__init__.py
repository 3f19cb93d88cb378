"""TensorRT backend (NVIDIA GPUs), laid out as Polygraphy lays out its backends.

* :mod:`.runner` — :class:`TensorRTEngine`: build, load, run and describe a plan;
* :mod:`.meta` — what a serialized plan was built for and whether it may be loaded here, and the
  per-layer precision read from the engine inspector (pure Python, no TensorRT import);
* :mod:`.modelopt_qdq` — the ONNX that fixes a strongly-typed engine's precision: the calibrated Q/DQ
  ONNX (ModelOpt, runs on the CPU) and the FP16 copy.

Importing this package imports neither TensorRT nor ModelOpt.
"""

from engine_tools.engines.tensorrt.runner import TensorRTEngine

__all__ = ["TensorRTEngine"]
