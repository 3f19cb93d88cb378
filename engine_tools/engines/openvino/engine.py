"""OpenVINO engine on the CPU: strict FP32, BF16/FP16 inference hints, and INT8 via NNCF PTQ.

The FP32 ONNX export is read with :meth:`openvino.Core.read_model` (not ``convert_model``, whose
converter reports usage; see :mod:`engine_tools.privacy`), fixed to batch 1 at the card's window and
saved as OpenVINO IR (``model.xml`` + ``model.bin``). INT8 builds quantize that model with
:func:`nncf.quantize` through the accuracy guard (:mod:`engine_tools.guard`, with the NNCF adapter of
:mod:`engine_tools.engines.openvino.quantize`): INT8 argmax labels are compared with strict FP32 on the
held-out validation windows and, below the target mean agreement Dice, calibration is improved and
then the layers that hurt most are kept in higher precision.

:meth:`OpenVINOEngine.describe` proves which kernels ran: it reads every executed op's
``primitiveType`` from the compiled runtime model (``brgconv_avx512_amx_i8`` is an INT8 kernel,
``..._f32``/``..._bf16`` are not).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.cache import cache_dir, sha256_file
from engine_tools.engines.base import BuildRequest, Engine, _progress
from engine_tools.engines.openvino.class_outputs import with_argmax_output
from engine_tools.engines.openvino.runtime import (
    _ov,
    compile_on_cpu,
    executed_kernels,
    read_static_model,
    run_compiled,
)
from engine_tools.progress import Progress

MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"

#: INFERENCE_PRECISION_HINT per engine precision. INT8 models run their kept (unquantized) layers
#: in ``int8_fallback``: bf16 where the CPU computes it natively (AMX / AVX512-BF16), else f32; the
#: accuracy guard measures INT8 with that fallback, so whatever it costs in agreement is accounted for.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


#: the lock file, in the compiled-blob cache, that one compiling process holds
COMPILE_LOCK = ".compile.lock"


def _core() -> Any:
    """An OpenVINO core whose compiled blobs are cached in the user cache (``CACHE_DIR``), so a
    cached engine is not compiled again on the next start."""
    core = _ov().Core()
    core.set_property({"CACHE_DIR": str(cache_dir("openvino-compiled"))})
    return core


def compile_with_blob_cache(model: Any, config: dict[str, str]) -> tuple[Any, list[str]]:
    """:func:`compile_on_cpu` through the compiled-blob cache, one process at a time: OpenVINO writes a
    blob in place and maps it when importing, so a second process starting the same engine (a
    cohort's workers, two builds or segmentations at once) could otherwise import a blob another one
    is still writing (a build failed that way under load)."""
    from filelock import FileLock

    with FileLock(str(cache_dir("openvino-compiled") / COMPILE_LOCK)):
        return compile_on_cpu(model, config, _core())


class OpenVINOEngine(Engine):
    backend = "openvino"
    supported_precisions = ("fp32", "bf16", "fp16", "int8")
    any_spatial_shape = True

    def __init__(self, precision: str = "fp32", device: str | None = None) -> None:
        super().__init__(precision, device)
        if self.device.lower() != "cpu":
            raise ValueError(f"the OpenVINO engine runs on the CPU here, not on {self.device!r}")
        self.device = "cpu"
        self._compiled: Any = None
        self._request: Any = None
        self._input_shape: tuple[int, ...] | None = None
        self._model: Any = None
        #: the most recent other input shape, whether it gives labels, and its compiled model
        self._reshaped: tuple[tuple[int, ...], bool, Any] | None = None
        #: the model compiled last (a whole volume's or the window's) and the convolutions it runs on
        #: sub-grids (engines/openvino/dilated.py): what describe() reports
        self._last_compiled: Any = None
        self._subgrid_layers: list[str] = []

    # ------------------------------------------------------------------ availability / versions
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            ov = _ov()
        except ImportError as exc:
            return False, f"OpenVINO is not installed ({exc}); pip install openvino nncf"
        return True, f"openvino {ov.get_version()}"

    def versions(self) -> dict[str, str]:
        ov = _ov()
        found = {**super().versions(), "openvino": ov.get_version()}
        if self.precision == "int8":  # read without importing NNCF (a cached engine never needs it)
            from importlib.metadata import PackageNotFoundError, version

            try:
                found["nncf"] = version("nncf")
            except PackageNotFoundError:  # a run-only install: INT8 engines cannot be built here
                found["nncf"] = "not installed"
        return found

    # ------------------------------------------------------------------ build
    def build(
        self, request: BuildRequest, artifact_dir: Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        progress = _progress(progress)
        ov = _ov()
        if request.onnx_path is None or not Path(request.onnx_path).is_file():
            raise FileNotFoundError(f"{request.model_id}: FP32 ONNX export not found: {request.onnx_path}")
        progress.update("compile", 0.0, "reading the FP32 ONNX model")
        model = read_static_model(request.onnx_path, request.in_channels, request.window_shape)
        report: dict[str, Any] = {"window": list(request.window_shape), "precision": self.precision}
        artifact_dir = Path(artifact_dir)
        if self.precision == "int8":
            model, guard_report = self._quantize(model, request, progress)
            report.update(guard_report)
        progress.update("compile", 0.9, "saving OpenVINO IR")
        start = time.perf_counter()
        ov.save_model(model, artifact_dir / MODEL_XML, compress_to_fp16=self.precision == "fp16")
        report["engine_stage_seconds"] = {"save": time.perf_counter() - start}
        progress.update("compile", 1.0, f"OpenVINO IR saved ({MODEL_XML})")
        self.build_report = report
        return report

    def _quantize(self, model: Any, request: BuildRequest, progress: Progress) -> tuple[Any, dict[str, Any]]:
        from engine_tools.engines.openvino.quantize import NNCFAdapter
        from engine_tools.guard import AccuracyGuard

        if request.calibration is None or len(request.calibration) == 0:
            raise ValueError(
                f"{request.model_id}: INT8 needs calibration windows (a folder of unlabeled scans)"
            )
        options = dict(request.options)
        # the FP32 reference of the same network on the same samples is reused across builds
        options.setdefault(
            "reference_network",
            f"openvino {_ov().__version__} onnx {sha256_file(request.onnx_path)} in {request.in_channels}",
        )
        adapter = NNCFAdapter(model, request.calibration, options, request.validation)
        guard = AccuracyGuard(adapter, request.validation, request.calibration, options, progress)
        progress.update("quantize", 0.05, f"NNCF PTQ on {len(request.calibration)} samples")
        quantized, guard_report = guard.run()
        quantized = adapter.to_static(quantized)
        report = {
            **guard_report.recipe,
            "calibration_windows": len(request.calibration),
            "validation_windows": len(guard.validation),
            "accuracy_guard": guard_report.to_json(),
            "kept_in_higher_precision": guard_report.kept_in_higher_precision,
            "int8_fallback": adapter.fallback,
        }
        return quantized, report

    # ------------------------------------------------------------------ load / run
    def compile_config(self) -> dict[str, str]:
        if self.precision == "int8":
            hint = self.build_report.get("int8_fallback", "f32")
        else:
            hint = PRECISION_HINTS[self.precision]
        return {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}

    def load(self, artifact_dir: Path) -> None:
        _ov()  # raises ImportError with the usual message when OpenVINO is missing
        artifact_dir = Path(artifact_dir)
        xml = artifact_dir / MODEL_XML
        if not xml.is_file():
            raise FileNotFoundError(f"OpenVINO engine artifact missing: {xml}")
        self._model = _core().read_model(xml)
        self._input_shape = tuple(int(d) for d in self._model.input(0).get_shape())
        self._compiled = self._request = self._reshaped = self._last_compiled = None  # compiled on first use
        self.artifact_dir = artifact_dir

    def _window_request(self) -> Any:
        """The infer request of the model at its window shape, compiled on first use (a whole-volume
        segmentation never needs it)."""
        if self._model is None:
            raise RuntimeError("engine not loaded")
        if self._compiled is None:
            self._compiled, self._subgrid_layers = compile_with_blob_cache(self._model, self.compile_config())
            self._request = self._compiled.create_infer_request()
            self._last_compiled = self._compiled
        return self._request

    def _request_for(self, shape: tuple[int, ...], labels: bool) -> Any:
        """A new infer request of the model reshaped to ``shape`` (kept compiled for the next call),
        ending in the argmax over classes when ``labels``."""
        if self._model is None:
            raise RuntimeError("engine not loaded")
        if self._reshaped is None or self._reshaped[:2] != (shape, labels):
            model = self._model.clone()
            model.reshape({model.input(0): _ov().PartialShape(list(shape))})
            if labels:
                model = with_argmax_output(model)
            compiled, self._subgrid_layers = compile_with_blob_cache(model, self.compile_config())
            self._reshaped = (shape, labels, compiled)
            self._last_compiled = compiled
        return self._reshaped[2].create_infer_request()

    def run(self, windows: np.ndarray) -> np.ndarray:
        """Run ``N, C, D, H, W``; a spatial shape other than the window's (one pass over a whole volume
        of a fully convolutional network) runs the same model reshaped to it."""
        shape = (1, *windows.shape[1:])
        if shape == self._input_shape:
            return run_compiled(self._window_request(), windows, self._input_shape)
        # a new request per call; one whole volume has it write the logits straight into the result
        return run_compiled(self._request_for(shape, False), windows, shape, write_in_place=len(windows) == 1)

    def run_labels(self, volume: np.ndarray) -> tuple[np.ndarray, int]:
        """Class index per voxel from the network itself (its logits end in an arg-max,
        :func:`with_argmax_output`): the logits of a whole volume are never written out, also where
        the volume has the window's shape (104 classes over a 192^3 window are 2.9 GB of logits)."""
        shape = (1, *volume.shape[1:])
        request = self._request_for(shape, True)
        labels = run_compiled(request, volume, shape, write_in_place=len(volume) == 1)
        return labels[:, 0], int(self._model.output(0).get_partial_shape()[1].get_length())

    # ------------------------------------------------------------------ describe
    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["compile_config"] = self.compile_config()
        if self._model is not None:
            if self._last_compiled is None:  # describe the window's model when nothing ran yet
                self._window_request()
            info["kernels"] = executed_kernels(self._last_compiled)
            info["dilated_convolutions_on_subgrids"] = list(self._subgrid_layers)
        for key in ("calibration_method", "calibration_windows", "preset"):
            if key in self.build_report:
                info[key] = self.build_report[key]
        return info
