"""ONNX Runtime engine on the CPU: FP32 and INT8 (static QDQ), the portable secondary engine.

INT8 uses :func:`onnxruntime.quantization.quantize_static` in QDQ format with unsigned activations and
signed weights (U8S8: the combination ONNX Runtime's CPU provider fuses into ``QLinearConv`` for 3-D
convolutions; signed activations stay float), through the same accuracy guard as every backend
(:mod:`engine_tools.guard`, adapter :mod:`engine_tools.engines.onnxruntime.quantize`).
:meth:`OnnxRuntimeEngine.describe` reports which ops really run in INT8 by reading the graph ONNX
Runtime optimised for this machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.engines.base import BuildRequest, Engine, _progress
from engine_tools.engines.onnxruntime.quantize import QDQAdapter, run_session, session
from engine_tools.progress import Progress

MODEL_FILE = "model.onnx"
QUANT_REPORT = "quantization.json"
INT8_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearConvTranspose")
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul")


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
        from engine_tools.guard import AccuracyGuard

        options = dict(request.options)
        with tempfile.TemporaryDirectory(prefix="medquant-ort-") as scratch:
            adapter = QDQAdapter(
                Path(request.onnx_path), request.calibration, request.window_shape, Path(scratch), progress
            )
            guard = AccuracyGuard(adapter, request.validation, request.calibration, options, progress)
            quantized, guard_report = guard.run()
            shutil.copyfile(quantized, destination)
        report = {
            "precision": "int8",
            **guard_report.recipe,
            "calibration_windows": int(len(request.calibration)),
            "validation_windows": len(guard.validation),
            "kept_in_higher_precision": guard_report.kept_in_higher_precision,
            "accuracy_guard": guard_report.to_json(),
        }
        (Path(artifact_dir) / QUANT_REPORT).write_text(json.dumps(report, indent=2, default=str))
        self.build_report = report
        return report

    def load(self, artifact_dir: Path) -> None:
        artifact_dir = Path(artifact_dir)
        model = artifact_dir / MODEL_FILE
        if not model.is_file():
            raise FileNotFoundError(f"ONNX Runtime engine artifact missing: {model}")
        with tempfile.TemporaryDirectory(prefix="medquant-ort-opt-") as scratch:
            optimized = Path(scratch) / "optimized.onnx"
            self._session = session(model, optimized)
            self._op_counts = _op_counts(optimized) if optimized.is_file() else None
        self.artifact_dir = artifact_dir

    def run(self, windows: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("engine not loaded")
        return run_session(self._session, windows)

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


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))
