"""PyTorch compiled engine: ``torch.compile`` (Inductor) for GPUs without TensorRT, and for CPUs.

The artifact is the network's ``state_dict`` plus the compile settings (``compile.json``); the module
is rebuilt from the model card (:meth:`TorchCompiledEngine.attach_factory`, as for the eager PyTorch
engine) and compiled on first use. Inductor keeps its generated kernels in ``TORCHINDUCTOR_CACHE_DIR``,
which this engine points at ``cache_dir("torchinductor")`` unless the user set it, so the minutes a
``max-autotune`` compile takes on a GPU are paid once per machine.

On CUDA the default mode is ``max-autotune`` (Triton/cuDNN autotuning plus CUDA graphs) in FP16; on the
CPU it is Inductor's ``default`` mode (C++/OpenMP kernels) in FP32 or BF16. The batch is fixed at build
time: smaller batches are zero-padded to it so that no shape ever triggers a recompile.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.cache import cache_dir, write_json_atomic
from engine_tools.engines.base import BuildRequest, Engine, _progress
from engine_tools.progress import Progress

WEIGHTS_FILE = "model.pt"
SETTINGS_FILE = "compile.json"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def torch_dtype(precision: str) -> Any:
    """``fp32``/``fp16``/``bf16`` → the torch dtype."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def default_compile_mode(device: str) -> str:
    """``max-autotune`` (autotuned kernels + CUDA graphs) on CUDA, Inductor ``default`` on the CPU."""
    return "max-autotune" if device.startswith("cuda") else "default"


def use_inductor_cache() -> Path:
    """Point Inductor's on-disk kernel cache into the MedQuant cache (unless the user set one)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir("torchinductor"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_module(module: Any, device: str, precision: str, mode: str | None = None) -> Any:
    """Move ``module`` to ``device``/``precision`` (eval mode) and wrap it in ``torch.compile``."""
    import torch

    mode = mode or default_compile_mode(device)
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} unknown; choose one of {', '.join(COMPILE_MODES)}")
    use_inductor_cache()
    module = module.to(device=device, dtype=torch_dtype(precision)).eval()
    return torch.compile(module, mode=mode, dynamic=False)


class TorchCompiledEngine(Engine):
    backend = "torch-compiled"
    supported_precisions = ("fp32", "bf16", "fp16")

    def __init__(self, precision: str = "fp32", device: str | None = None) -> None:
        if device is None:
            device = _default_device()
        if precision == "fp16" and not device.startswith("cuda"):
            raise ValueError("torch-compiled fp16 needs a CUDA GPU; on the CPU use fp32 or bf16")
        super().__init__(precision, device)
        self._factory: Callable[[], Any] | None = None
        self._compiled: Any = None
        self.settings: dict[str, Any] = {}

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import torch
        except ImportError as exc:
            return False, f"PyTorch is not installed ({exc}); pip install torch"
        if torch.cuda.is_available():
            try:
                import triton  # noqa: F401
            except ImportError:
                return False, "CUDA is present but Triton is missing (Inductor needs it); pip install triton"
            return True, f"torch {torch.__version__}, CUDA GPU {torch.cuda.get_device_name(0)}"
        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            return False, "no C/C++ compiler found; Inductor needs one to compile CPU kernels"
        return True, f"torch {torch.__version__}, CPU (Inductor C++ kernels)"

    def versions(self) -> dict[str, str]:
        import torch

        found = {**super().versions(), "torch": torch.__version__}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            found["cuda"] = str(torch.version.cuda)
            found["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
        return found

    def attach_factory(self, factory: Callable[[], Any]) -> None:
        """Give the engine the callable that rebuilds the network (needed before :meth:`load`)."""
        self._factory = factory

    def build(
        self, request: BuildRequest, artifact_dir: Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        import torch

        progress = _progress(progress)
        if request.torch_module_factory is None:
            raise ValueError(
                f"{request.model_id}: the compiled PyTorch engine needs a PyTorch network "
                "(this model is ONNX-only; use onnxruntime, openvino or tensorrt)"
            )
        self._factory = request.torch_module_factory
        artifact_dir = Path(artifact_dir)
        module = self._factory()
        torch.save(module.state_dict(), artifact_dir / WEIGHTS_FILE)
        mode = request.options.get("compile_mode") or default_compile_mode(self.device)
        settings = {
            "mode": mode,
            "precision": self.precision,
            "device": self.device,
            "batch": int(request.options.get("batch", 1)),
            "window": list(request.window_shape),
            "in_channels": request.in_channels,
            "num_classes": request.num_classes,
            "torch": torch.__version__,
        }
        write_json_atomic(artifact_dir / SETTINGS_FILE, settings)
        report: dict[str, Any] = {"weights_file": WEIGHTS_FILE, "compile": settings}
        if request.options.get("warm_compile", True):
            # Compile once now so the (slow) autotuning lands in the Inductor cache at build time.
            progress.update("compile", 0.0, f"torch.compile mode={mode} ({self.precision}, {self.device})")
            self.load(artifact_dir)
            report["compile_seconds"] = self.warm_up()
            progress.update("compile", 1.0, f"compiled in {report['compile_seconds']:.1f} s")
        report["inductor_cache"] = str(use_inductor_cache())
        self.build_report = report
        return report

    def load(self, artifact_dir: Path) -> None:
        import torch

        if self._factory is None:
            raise RuntimeError(
                "TorchCompiledEngine.load needs attach_factory() first (the card's network builder)"
            )
        artifact_dir = Path(artifact_dir)
        settings_path = artifact_dir / SETTINGS_FILE
        if not settings_path.is_file():
            raise FileNotFoundError(f"{settings_path}: compile settings missing; rebuild the engine")
        self.settings = json.loads(settings_path.read_text(encoding="utf-8"))
        module = self._factory()
        state = torch.load(artifact_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        self._compiled = compile_module(module, self.device, self.precision, self.settings.get("mode"))
        self.artifact_dir = artifact_dir

    def warm_up(self) -> float:
        """Run one zero-padded batch so Inductor compiles; returns the seconds it took."""
        shape = (self.settings["batch"], self.settings["in_channels"], *self.settings["window"])
        started = time.perf_counter()
        self.run(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        return round(time.perf_counter() - started, 2)

    def run_torch(self, batch: Any) -> Any:
        """Torch tensor ``N, C, D, H, W`` (any device/dtype) → float32 logits on the engine's device."""
        import torch

        if self._compiled is None:
            raise RuntimeError("engine not loaded")
        fixed = int(self.settings.get("batch", 1))
        count = int(batch.shape[0])
        outputs = []
        with torch.inference_mode():
            for start in range(0, count, fixed):
                chunk = batch[start : start + fixed].to(self.device, torch_dtype(self.precision))
                if chunk.shape[0] < fixed:  # pad to the compiled batch: no recompile
                    pad = chunk.new_zeros((fixed - chunk.shape[0], *chunk.shape[1:]))
                    chunk = torch.cat([chunk, pad])
                if self.device.startswith("cuda"):
                    torch.compiler.cudagraph_mark_step_begin()
                # clone: CUDA-graph outputs are overwritten by the next replay
                outputs.append(self._compiled(chunk)[: min(fixed, count - start)].float().clone())
        return torch.cat(outputs)

    def run(self, windows: np.ndarray) -> np.ndarray:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        return self.run_torch(batch).cpu().numpy()

    def predictor(self) -> Callable[[Any], Any]:
        """Keeps tensors on the GPU for MONAI ``sliding_window_inference``."""
        return self.run_torch

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "compile": self.settings,
            "compile_seconds": self.build_report.get("compile_seconds"),
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        }


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
