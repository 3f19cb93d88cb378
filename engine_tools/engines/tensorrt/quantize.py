"""ModelOpt Q/DQ quantization as the accuracy guard's TensorRT adapter.

:class:`ModelOptAdapter` is :class:`engine_tools.engines.onnxruntime.quantize.QDQAdapter` with ModelOpt
as the quantizer: layers the guard keeps are left out of the Q/DQ ONNX through ``nodes_to_exclude``
(the ONNX TensorRT builds its strongly typed INT8 engine from), and candidates are evaluated on ONNX
Runtime's CPU provider, which runs the same Q/DQ arithmetic, so the guard needs no GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_tools.engines.onnxruntime.quantize import QDQAdapter
from engine_tools.engines.tensorrt.modelopt_qdq import CALIBRATION_METHODS, quantize_qdq

#: the product's calibration-method names that ModelOpt spells differently
METHOD_ALIASES = {"minmax": "max"}


class ModelOptAdapter(QDQAdapter):
    """The accuracy guard's view of an FP32 ONNX model quantized by ModelOpt for TensorRT."""

    fallback = "f32"
    #: no one-pass taps: ModelOpt's Q/DQ graph casts around the layers it keeps (FP16) and renames
    #: tensors, so the guard ranks layers by keeping each one alone (the per-layer method)
    layer_taps = None

    def recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        method = str(options.get("modelopt_calibration_method", "max"))
        method = METHOD_ALIASES.get(method, method)
        if method not in CALIBRATION_METHODS:
            raise ValueError(
                f"ModelOpt calibration method must be one of {CALIBRATION_METHODS}, not {method!r}"
            )
        return {
            "calibration_method": method,
            "high_precision_dtype": str(options.get("high_precision_dtype", "fp16")),
            "keep_higher_precision": list(options.get("keep_higher_precision_patterns", [])),
            "quantize_conv_transpose": bool(options.get("quantize_conv_transpose", False)),
        }

    def better_recipes(self, recipe: dict[str, Any]) -> list[dict[str, Any]]:
        other = "entropy" if recipe["calibration_method"] == "max" else "max"
        return [{**recipe, "calibration_method": other}]

    def quantize(self, excluded: Sequence[str], recipe: dict[str, Any]) -> Path:
        destination = self._next_path("qdq")
        self._made[destination] = (list(excluded), dict(recipe))
        quantize_qdq(
            self.onnx_path,
            self.calibration,
            destination,
            calibration_method=recipe["calibration_method"],
            high_precision_dtype=recipe["high_precision_dtype"],
            keep_higher_precision=recipe["keep_higher_precision"],
            nodes_to_exclude=list(excluded),
            quantize_conv_transpose=recipe.get("quantize_conv_transpose", False),
            progress=self.progress,
        )
        return destination
