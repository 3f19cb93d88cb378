"""TensorRT engine (NVIDIA GPUs): strongly-typed networks from FP32, FP16 or calibrated Q/DQ ONNX.

Targets TensorRT 10.x and 11.x (:func:`engine_tools.engines.tensorrt.meta.version_features`). Precision never comes
from builder flags (TensorRT 10 deprecated, 11 removed ``BuilderFlag.FP16/INT8`` and implicit INT8
calibrators); it comes from the ONNX types of a strongly-typed network:

* ``fp32``: the FP32 export as is, TF32 cleared (IEEE FP32, the baseline INT8 is compared with);
* ``tf32``: the same ONNX with TF32 allowed (TensorRT's default), its own row;
* ``fp16``: mixed FP16/FP32 made by ModelOpt AutoCast, norms and softmax kept FP32
  (:func:`.modelopt_qdq.convert_fp16_onnx`);
* ``int8``: a Q/DQ ONNX calibrated by ModelOpt on the calibration windows (:func:`.modelopt_qdq.quantize_qdq`),
  the rest FP16 (recipe ``medquant``) or FP32 (recipe ``medptq``, the paper's).

The plan is built (:func:`.builder.build_plan`) with an optimization profile read against the
network's static dimensions, a workspace of the device memory minus a margin, a timing cache per
TensorRT version and compute capability (locked, merged), ``ProfilingVerbosity.DETAILED`` (for the
per-layer precision report) and written atomically together with ``trt_meta.json``. A cached engine
from another GPU or TensorRT version is refused before deserialization (:mod:`.meta`). Inference binds
PyTorch CUDA tensors (``set_tensor_address``) and runs ``execute_async_v3`` on a dedicated CUDA stream
with NVTX markers lowered to layer names, optionally replayed from a captured CUDA graph.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.cache import atomic_file, sha256_file, write_json_atomic
from engine_tools.engines.base import BuildRequest, Engine, _progress
from engine_tools.engines.tensorrt.builder import build_plan
from engine_tools.engines.tensorrt.meta import (
    META_FILE,
    EngineMeta,
    check_compatibility,
    layer_precisions,
    summarize_layers,
    version_features,
)
from engine_tools.progress import Progress

PLAN_FILE = "model.plan"
_METHODS = {"minmax": "max", "max": "max", "entropy": "entropy"}


def _trt() -> Any:
    import tensorrt

    if not hasattr(tensorrt, "__version__"):  # a folder named tensorrt on sys.path, not the package
        where = list(getattr(tensorrt, "__path__", [])) or getattr(tensorrt, "__file__", "?")
        raise ImportError(f"'tensorrt' at {where} is not NVIDIA's TensorRT package")
    return tensorrt


def current_platform() -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine (needs tensorrt + CUDA)."""
    import torch

    trt = _trt()
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def device_memory() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


class TensorRTEngine(Engine):
    backend = "tensorrt"
    supported_precisions = ("fp32", "tf32", "fp16", "int8")
    default_device = "cuda"

    def __init__(self, precision: str = "int8", device: str | None = None) -> None:
        super().__init__(precision, device)
        self.meta: dict[str, Any] = {}
        self.expected: dict[str, Any] = {}
        self._engine: Any = None
        self._context: Any = None
        self._graph: Any = None
        self._graph_io: tuple[Any, Any] | None = None
        self._stream: Any = None
        self.use_cuda_graph = False

    # -- availability -------------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            trt = _trt()
        except ImportError as exc:
            return False, (
                f"the tensorrt Python package does not import ({exc}); on a machine with an NVIDIA GPU: "
                "pip install -r requirements-tensorrt.txt (see docs/TENSORRT.md)"
            )
        features = version_features(trt.__version__)
        if not features["supported"]:
            return False, f"TensorRT {trt.__version__} found; this code targets TensorRT 10.x and 11.x"
        try:
            import torch
        except ImportError as exc:
            return False, f"PyTorch is needed to hold GPU buffers ({exc})"
        if not torch.cuda.is_available():
            return False, f"TensorRT {trt.__version__} found but no CUDA GPU is visible to PyTorch"
        return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"

    def versions(self) -> dict[str, str]:
        found = super().versions()
        try:
            found.update(current_platform())
        except Exception:  # noqa: BLE001 - versions are informative only
            pass
        return found

    # -- build ----------------------------------------------------------------------------------------
    def build(
        self, request: BuildRequest, artifact_dir: Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        self.require_available()
        progress = _progress(progress)
        if request.onnx_path is None:
            raise ValueError(f"{request.model_id}: TensorRT builds from the ONNX export; none was given")
        artifact_dir = Path(artifact_dir)
        options = request.options
        batch = int(options.get("batch", 1))
        report: dict[str, Any] = {"precision": self.precision, "batch": batch}
        with tempfile.TemporaryDirectory(prefix="medquant-trt-") as tmp:
            onnx_file, onnx_kind, calibration_hash = self._typed_onnx(request, Path(tmp), report, progress)
            progress.update("tensorrt", 0.3, f"building {self.precision} engine (strongly typed)")
            platform = current_platform()
            plan, build_log = build_plan(
                _trt(),
                onnx_file,
                precision=self.precision,
                channels=request.in_channels,
                window=request.window_shape,
                batch=batch,
                options=options,
                total_memory=device_memory(),
                compute_capability=platform["compute_capability"],
            )
        if build_log["profile"]["note"]:
            progress.warning(build_log["profile"]["note"])
        with atomic_file(artifact_dir / PLAN_FILE) as stream:
            stream.write(plan)
        meta = EngineMeta(
            tensorrt_version=platform["tensorrt_version"],
            gpu_name=platform["gpu_name"],
            compute_capability=platform["compute_capability"],
            precision=self.precision,
            model_sha256=sha256_file(request.onnx_path),
            engine_sha256=sha256_file(artifact_dir / PLAN_FILE),
            calibration_sha256=calibration_hash,
            onnx_kind=onnx_kind,
            batch=int(build_log["profile"]["batch"]),
            static_batch=bool(build_log["profile"]["static_batch"]),
            window=tuple(request.window_shape),
        )
        write_json_atomic(artifact_dir / META_FILE, meta.to_json())
        report.update(build_log, meta=meta.to_json())
        progress.update("tensorrt", 1.0, f"engine {len(plan) / 2**20:.1f} MiB")
        self.load(artifact_dir)
        layers = self.layer_report()
        report["layers"] = summarize_layers(layers)
        for key in ("warning", "unresolved_warning"):
            if key in report["layers"]:
                progress.warning(report["layers"][key])
        self.build_report = report
        return report

    def _typed_onnx(
        self, request: BuildRequest, tmp: Path, report: dict[str, Any], progress: Progress
    ) -> tuple[Path, str, str | None]:
        """The ONNX whose types fix the engine's precision, plus its kind and the calibration hash."""
        from engine_tools.engines.tensorrt import modelopt_qdq

        assert request.onnx_path is not None
        if self.precision in ("fp32", "tf32"):
            return Path(request.onnx_path), "fp32", None
        if self.precision == "fp16":
            progress.update("tensorrt", 0.05, "mixed FP16/FP32 ONNX (ModelOpt AutoCast)")
            fp16 = modelopt_qdq.convert_fp16_onnx(
                request.onnx_path, tmp / "model_fp16.onnx", calibration=request.calibration
            )
            return fp16, "fp16", None
        if request.calibration is None or len(request.calibration) == 0:
            raise ValueError(f"{request.model_id}: INT8 needs calibration windows (BuildRequest.calibration)")
        options = request.options
        method = str(options.get("calibration_method", "max"))
        if method not in _METHODS:
            raise ValueError(f"calibration_method {method!r} unknown for TensorRT; use max or entropy")
        recipe = str(options.get("tensorrt_recipe", modelopt_qdq.DEFAULT_RECIPE))
        high_precision = str(options.get("high_precision_dtype", modelopt_qdq.recipe_dtype(recipe)))
        if request.validation is not None and len(request.validation) > 0:
            with progress.span(0.0, 0.3):
                path = self._guarded_qdq(request, tmp, _METHODS[method], high_precision, report, progress)
            report["qdq"] = {**report.get("qdq", {}), "recipe": recipe}
            return path, "qdq", _array_hash(request.calibration)
        with progress.span(0.0, 0.3):
            result = modelopt_qdq.quantize_qdq(
                request.onnx_path,
                request.calibration,
                tmp / "model_qdq.onnx",
                calibration_method=_METHODS[method],
                high_precision_dtype=high_precision,
                keep_higher_precision=options.get("keep_higher_precision_patterns", []),
                nodes_to_exclude=options.get("ignored_layers", []),
                quantize_conv_transpose=bool(options.get("quantize_conv_transpose", False)),
                progress=progress,
            )
        description = modelopt_qdq.RECIPES.get(recipe, {}).get("description", "")
        report["qdq"] = {**result.to_json(), "recipe": recipe, "recipe_description": description}
        for note in result.notes:
            progress.warning(note)
        return result.path, "qdq", _array_hash(request.calibration)

    @staticmethod
    def _guarded_qdq(
        request: BuildRequest,
        tmp: Path,
        method: str,
        high_precision: str,
        report: dict[str, Any],
        progress: Progress,
    ) -> Path:
        """The Q/DQ ONNX chosen by the shared accuracy guard (ModelOpt quantizes, layers the guard keeps
        are left out through ``nodes_to_exclude``; candidates are checked on ONNX Runtime's CPU)."""
        from engine_tools.engines.tensorrt.quantize import ModelOptAdapter
        from engine_tools.guard import AccuracyGuard

        assert request.onnx_path is not None and request.calibration is not None
        options = {
            **request.options,
            "modelopt_calibration_method": method,
            "high_precision_dtype": high_precision,
        }
        adapter = ModelOptAdapter(
            Path(request.onnx_path), request.calibration, request.window_shape, tmp, progress
        )
        guard = AccuracyGuard(adapter, request.validation, request.calibration, options, progress)
        chosen, guard_report = guard.run()
        destination = tmp / "model_qdq_guarded.onnx"
        shutil.copyfile(chosen, destination)
        report["accuracy_guard"] = guard_report.to_json()
        report["kept_in_higher_precision"] = guard_report.kept_in_higher_precision
        return destination

    # -- load / run -------------------------------------------------------------------------------------
    def expect(self, **fields: Any) -> None:
        """What the caller requires of a cached engine (``model_sha256``, ``calibration_sha256``, ...)."""
        self.expected.update({k: v for k, v in fields.items() if v is not None})

    def load(self, artifact_dir: Path) -> None:
        self.require_available()
        artifact_dir = Path(artifact_dir)
        current = {**current_platform(), "precision": self.precision, **self.expected}
        self.meta = check_compatibility(artifact_dir / META_FILE, current)
        plan_path = artifact_dir / PLAN_FILE
        if sha256_file(plan_path) != self.meta["engine_sha256"]:
            raise RuntimeError(f"{plan_path}: engine file does not match its metadata hash; rebuild it")
        trt = _trt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT could not deserialize the engine; rebuild it")
        import torch

        self._engine = engine
        self._context = engine.create_execution_context()
        # built with DETAILED for the inspector; at run time NVTX ranges carry layer names only
        self._context.nvtx_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        self._stream = torch.cuda.Stream()  # enqueueV3 on the legacy default stream adds syncs
        self._graph = None
        self.artifact_dir = artifact_dir

    def _io_names(self) -> tuple[str, str]:
        trt = _trt()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        return inputs[0], outputs[0]

    def _torch_dtype(self, name: str) -> Any:
        import torch

        trt = _trt()
        mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        return mapping[self._engine.get_tensor_dtype(name)]

    def run_torch(self, batch: Any) -> Any:
        """Torch tensor ``N, C, D, H, W`` → float32 logits on the GPU (chunks of the profile's batch)."""
        import torch

        if self._context is None:
            raise RuntimeError("engine not loaded")
        input_name, output_name = self._io_names()
        limit = int(self.meta.get("batch", 1))
        outputs = []
        for start in range(0, int(batch.shape[0]), limit):
            chunk = batch[start : start + limit].to("cuda", self._torch_dtype(input_name)).contiguous()
            count = int(chunk.shape[0])
            if self.meta.get("static_batch") and count < limit:  # the plan only runs its fixed batch
                chunk = torch.cat([chunk, chunk.new_zeros((limit - count, *chunk.shape[1:]))])
            outputs.append(self._execute(chunk, input_name, output_name)[:count].float())
        return torch.cat(outputs)

    def _execute(self, chunk: Any, input_name: str, output_name: str) -> Any:
        import torch

        self._context.set_input_shape(input_name, tuple(chunk.shape))
        out_shape = tuple(self._context.get_tensor_shape(output_name))
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())  # the input was written on the caller's stream
        if self.use_cuda_graph and chunk.shape[0] == int(self.meta.get("batch", 1)):
            return self._graph_replay(chunk, input_name, output_name, out_shape).clone()
        output = torch.empty(out_shape, dtype=self._torch_dtype(output_name), device="cuda")
        self._context.set_tensor_address(input_name, chunk.data_ptr())
        self._context.set_tensor_address(output_name, output.data_ptr())
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return output

    def _graph_replay(self, chunk: Any, input_name: str, output_name: str, out_shape: tuple[int, ...]) -> Any:
        """Capture ``execute_async_v3`` once into a CUDA graph on static buffers, then replay it."""
        import torch

        if self._graph is None:
            static_in = torch.empty_like(chunk)
            static_out = torch.empty(out_shape, dtype=self._torch_dtype(output_name), device="cuda")
            self._context.set_tensor_address(input_name, static_in.data_ptr())
            self._context.set_tensor_address(output_name, static_out.data_ptr())
            stream = self._stream
            with torch.cuda.stream(stream):
                self._context.execute_async_v3(stream.cuda_stream)  # warm-up outside capture
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self._context.execute_async_v3(stream.cuda_stream)
            self._graph, self._graph_io = graph, (static_in, static_out)
        assert self._graph_io is not None
        static_in, static_out = self._graph_io
        with torch.cuda.stream(self._stream):
            static_in.copy_(chunk)
            self._graph.replay()
        self._stream.synchronize()
        return static_out

    def run(self, windows: np.ndarray) -> np.ndarray:
        import torch

        return self.run_torch(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))).cpu().numpy()

    def predictor(self) -> Callable[[Any], Any]:
        """Keeps tensors on the GPU for MONAI ``sliding_window_inference``."""
        return self.run_torch

    # -- describe ---------------------------------------------------------------------------------------
    def layer_report(self) -> list[dict[str, Any]]:
        """Per-layer precision from the engine inspector (needs ``ProfilingVerbosity.DETAILED``)."""
        if self._engine is None:
            return []
        input_name, _ = self._io_names()
        info = engine_information(self._engine, self._context, input_name, _trt().LayerInformationFormat.JSON)
        return layer_precisions(info)

    def describe(self) -> dict[str, Any]:
        layers = self.layer_report()
        return {
            **super().describe(),
            "tensorrt": self.meta,
            "layers": summarize_layers(layers),
            "cuda_graph": self.use_cuda_graph,
        }


def engine_information(engine: Any, context: Any, input_name: str, json_format: Any) -> dict[str, Any]:
    """``IEngineInspector.get_engine_information`` with the shapes resolved.

    With a dynamic input every tensor format reads "N/A due to dynamic shapes" unless the inspector has
    an execution context whose input shape is set: the context gets the profile's opt shape
    (``ICudaEngine.get_tensor_profile_shape``) and is attached as ``inspector.execution_context``.
    """
    shape = tuple(engine.get_tensor_shape(input_name))
    if any(d == -1 for d in shape):
        shape = tuple(engine.get_tensor_profile_shape(input_name, 0)[1])
    if not context.set_input_shape(input_name, shape):
        raise RuntimeError(f"TensorRT refused input shape {shape} for the inspector")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return json.loads(inspector.get_engine_information(json_format))


def _array_hash(array: np.ndarray) -> str:
    import hashlib

    digest = hashlib.sha256(str((array.shape, str(array.dtype))).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
