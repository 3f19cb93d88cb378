"""ONNX Runtime engine on the CPU: FP32 and INT8 (static QDQ), the portable secondary engine.

INT8 uses :func:`onnxruntime.quantization.quantize_static` in QDQ format with unsigned activations and
signed weights (U8S8: the combination ONNX Runtime's CPU provider fuses into ``QLinearConv`` for 3-D
convolutions; signed activations stay float). :meth:`OnnxRuntimeEngine.describe` reports which ops
really run in INT8 by reading the graph ONNX Runtime optimised for this machine.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools import accuracy
from engine_tools.engines.base import BuildRequest, Engine, _progress
from engine_tools.engines.openvino_engine import cpu_has_vnni
from engine_tools.progress import Progress

MODEL_FILE = "model.onnx"
QUANT_REPORT = "quantization.json"
INT8_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearConvTranspose")
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul")


class _WindowReader:
    """A ``CalibrationDataReader`` over ``N, C, D, H, W`` windows (one window per batch)."""

    def __init__(self, input_name: str, windows: np.ndarray, progress: Progress) -> None:
        self.input_name = input_name
        self.windows = windows
        self.progress = progress
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.windows):
            return None
        self.progress.update("calibrate", self.index / len(self.windows), f"window {self.index + 1}")
        window = np.ascontiguousarray(self.windows[self.index : self.index + 1], dtype=np.float32)
        self.index += 1
        return {self.input_name: window}

    def rewind(self) -> None:
        self.index = 0


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"
    supported_precisions = ("fp32", "int8")

    def __init__(self, precision: str = "fp32", device: str | None = None) -> None:
        super().__init__(precision, device)
        if self.device.lower() != "cpu":
            raise ValueError(f"the ONNX Runtime engine runs on the CPU here, not on {self.device!r}")
        self.device = "cpu"
        self._session: Any = None
        self._op_counts: dict[str, int] | None = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError as exc:
            return False, f"ONNX Runtime is not installed ({exc}); pip install onnxruntime"
        return True, f"onnxruntime {onnxruntime.__version__}"

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {**super().versions(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}

    def build(
        self, request: BuildRequest, artifact_dir: Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        import onnx

        progress = _progress(progress)
        if request.onnx_path is None or not Path(request.onnx_path).is_file():
            raise FileNotFoundError(f"{request.model_id}: FP32 ONNX export not found: {request.onnx_path}")
        destination = Path(artifact_dir) / MODEL_FILE
        if self.precision == "fp32":
            progress.update("compile", 0.5, "copying the FP32 ONNX model")
            onnx.save(onnx.load(str(request.onnx_path)), str(destination))
            self.build_report = {"precision": "fp32"}
            return self.build_report
        if request.calibration is None or len(request.calibration) == 0:
            raise ValueError(
                f"{request.model_id}: INT8 needs calibration windows (a folder of unlabeled scans)"
            )
        report = self._quantize(request, destination, progress)
        if request.validation is not None and len(request.validation) and request.options.get("guard", True):
            progress.update("guard", 0.9, "checking INT8 against FP32 on held-out windows")
            reference = _run_session(_session(request.onnx_path), request.validation)
            test = _run_session(_session(destination), request.validation)
            agreement = accuracy.json_ready(accuracy.logits_agreement(reference, test))
            target = float(request.options.get("target_dice", 0.97))
            report["accuracy_guard"] = {
                "target": target,
                "initial_mean_dice": agreement["mean"],
                "final_mean_dice": agreement["mean"],
                "met_target": agreement["mean"] >= target,
                "per_label": agreement["per_label"],
                "worst": agreement["worst"],
                "sqnr_db": agreement.get("sqnr_db"),
                "kept_in_higher_precision": report["kept_in_higher_precision"],
                "attempts": [],
                "note": "ONNX Runtime engine: agreement is measured and reported; layer search runs in OpenVINO",
            }
            if agreement["mean"] < target:
                progress.warning(
                    f"ONNX Runtime INT8 agreement {agreement['mean']:.4f} is below {target}; "
                    "the OpenVINO engine's accuracy guard can keep sensitive layers in FP32"
                )
        (Path(artifact_dir) / QUANT_REPORT).write_text(json.dumps(report, indent=2, default=str))
        self.build_report = report
        return report

    def _quantize(self, request: BuildRequest, destination: Path, progress: Progress) -> dict[str, Any]:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method_name = str(request.options.get("calibration_method", "minmax"))
        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
        if method_name not in methods:
            raise ValueError(
                f"ONNX Runtime calibration_method must be minmax or percentile, not {method_name!r}"
            )
        model = onnx.load(str(request.onnx_path))
        input_name = model.graph.input[0].name
        patterns = list(request.options.get("keep_higher_precision_patterns", []))
        excluded = list(request.options.get("ignored_layers", []))
        if patterns:
            import re

            excluded += [n.name for n in model.graph.node if any(re.search(p, n.name) for p in patterns)]
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if method_name == "percentile":
            extra["CalibPercentile"] = float(request.options.get("percentile", 99.999))
        # Without VNNI the AVX2 u8*s8 dot product saturates: ONNX Runtime's remedy is 7-bit weights.
        reduce_range = bool(request.options.get("reduce_range", not cpu_has_vnni()))
        progress.update("quantize", 0.0, f"ONNX Runtime static QDQ quantization ({method_name})")
        with tempfile.TemporaryDirectory(prefix="medquant-ort-") as scratch:
            quantize_static(
                str(request.onnx_path),
                str(destination),
                _WindowReader(input_name, request.calibration, progress),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                calibrate_method=methods[method_name],
                nodes_to_exclude=excluded,
                extra_options={**extra, "CalibTensorRangeSymmetric": False},
                calibration_providers=["CPUExecutionProvider"],
                use_external_data_format=False,
            )
            del scratch
        return {
            "precision": "int8",
            "format": "QDQ U8S8 per-channel",
            "reduce_range": reduce_range,
            "calibration_method": method_name,
            "calibration_windows": int(len(request.calibration)),
            "kept_in_higher_precision": excluded,
        }

    def load(self, artifact_dir: Path) -> None:
        artifact_dir = Path(artifact_dir)
        model = artifact_dir / MODEL_FILE
        if not model.is_file():
            raise FileNotFoundError(f"ONNX Runtime engine artifact missing: {model}")
        with tempfile.TemporaryDirectory(prefix="medquant-ort-opt-") as scratch:
            optimized = Path(scratch) / "optimized.onnx"
            self._session = _session(model, optimized)
            self._op_counts = _op_counts(optimized) if optimized.is_file() else None
        self.artifact_dir = artifact_dir

    def run(self, windows: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("engine not loaded")
        return _run_session(self._session, windows)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self._op_counts is not None:
            counts = self._op_counts
            info["kernels"] = {
                "int8": sum(counts.get(op, 0) for op in INT8_OPS),
                "float": sum(counts.get(op, 0) for op in FLOAT_COMPUTE_OPS),
                "by_op_type": counts,
            }
        return info


def _session(model: str | Path, optimized_path: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the optimised-graph dump warns that it is machine specific: known
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _run_session(session: Any, windows: np.ndarray) -> np.ndarray:
    windows = np.ascontiguousarray(windows, dtype=np.float32)
    if windows.ndim != 5:
        raise ValueError(f"expected windows N, C, D, H, W; got shape {windows.shape}")
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: window[None]})[0] for window in windows]
    return np.concatenate(outputs, axis=0).astype(np.float32, copy=False)


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))
