"""The one engine interface that every backend implements.

An engine turns a network (its FP32 ONNX export, or the PyTorch module for the PyTorch engines) into
an artifact on disk for one precision and device (:meth:`Engine.build`), loads that artifact
(:meth:`Engine.load`), runs batches of windows (:meth:`Engine.run`) and says what it is
(:meth:`Engine.describe`). Tensors are ``float32`` numpy arrays in ``N, C, D, H, W`` order; ``run``
returns raw logits of shape ``N, num_classes, D, H, W``.
"""

from __future__ import annotations

import platform
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engine_tools.accuracy import class_argmax
from engine_tools.progress import Progress, SilentProgress

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")

#: File every engine artifact directory holds: what :meth:`Engine.build` returned plus cache keys.
METADATA_FILE = "engine.json"


class EngineUnavailable(RuntimeError):
    """The backend cannot run here (library missing, no GPU, ...); the message says why and what to do."""


#: Largest logits tensor of one slab where a whole volume's arg-max is taken slab by slab
#: (``engines/openvino/class_outputs.py``, ``TorchEngine.run_labels``): OpenVINO 2026.4's CPU TopK
#: crashes on inputs over 2 GiB, and a small slab keeps the logits out of the peak memory.
SLAB_BYTES = 256 * 2**20


@dataclass
class BuildRequest:
    """Everything an engine may need to build one artifact.

    ``onnx_path`` is the FP32 export (input ``"input"``, output ``"logits"``, dynamic batch).
    ``calibration`` are preprocessed samples for INT8 and ``validation`` held-out samples (scans that
    calibration never saw, where there are any) the accuracy guard compares INT8 with FP32 on: either
    ``N, C, D, H, W`` windows or, for fully convolutional networks on engines that run any spatial
    shape, a list of ``C, D, H, W`` whole cropped volumes of differing shapes. ``options`` carries
    backend settings such as ``calibration_method``, ``target_dice`` or ``ignored_layers``.
    """

    model_id: str
    onnx_path: Path | None
    window_shape: tuple[int, int, int]
    in_channels: int
    num_classes: int
    torch_module_factory: Callable[[], Any] | None = None
    calibration: np.ndarray | Sequence[np.ndarray] | None = None
    validation: np.ndarray | Sequence[np.ndarray] | None = None
    options: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """Base class of all inference engines (OpenVINO, ONNX Runtime, TensorRT, PyTorch)."""

    backend: ClassVar[str]
    supported_precisions: ClassVar[tuple[str, ...]]
    default_device: ClassVar[str] = "cpu"
    #: :meth:`run` accepts any spatial shape (one pass over a whole volume), not only the window's
    any_spatial_shape: ClassVar[bool] = False

    def __init__(self, precision: str = "fp32", device: str | None = None) -> None:
        if precision not in self.supported_precisions:
            raise ValueError(
                f"{self.backend} supports precisions {', '.join(self.supported_precisions)}, not {precision!r}"
            )
        self.precision = precision
        self.device = device or self.default_device
        self.artifact_dir: Path | None = None
        self.build_report: dict[str, Any] = {}
        #: "hit" (taken from the engine cache) or "built", set by whoever prepared the engine
        self.cache_status: str | None = None

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """``(True, version string)`` when usable here, else ``(False, reason and remedy)``."""

    @classmethod
    def require_available(cls) -> None:
        ok, reason = cls.availability()
        if not ok:
            raise EngineUnavailable(f"{cls.backend} is not available: {reason}")

    @abstractmethod
    def build(
        self, request: BuildRequest, artifact_dir: Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Write the engine artifact into ``artifact_dir`` (an empty, temporary directory) and return a
        JSON-serialisable build report (calibration used, layers kept in higher precision, ...)."""

    def attach_factory(self, factory: Callable[[], Any]) -> None:  # noqa: B027 (optional hook)
        """Give the engine the callable that rebuilds the network; engines that run the PyTorch module
        (rather than an artifact compiled from ONNX) need it before :meth:`load`, the others ignore it."""

    @abstractmethod
    def load(self, artifact_dir: Path) -> None:
        """Load a previously built artifact so that :meth:`run` can be called."""

    @abstractmethod
    def run(self, windows: np.ndarray) -> np.ndarray:
        """Run a batch ``N, C, D, H, W`` float32 and return logits ``N, K, D, H, W`` float32."""

    def run_labels(self, volume: np.ndarray) -> tuple[np.ndarray, int]:
        """Class index per voxel of a batch ``N, C, D, H, W`` (``N, D, H, W``: the arg-max over the
        logits' channels, the first on ties) and the number of channels. Engines that can take the
        arg-max inside the network override this so that a whole volume's logits are never written."""
        logits = self.run(volume)  # arg-max one class at a time: no class-last copy of the logits
        return class_argmax(logits), int(logits.shape[1])

    def artifact_files(self) -> list[Path]:
        """Files that make up the deployable engine (counted in ``bytes_on_disk``)."""
        if self.artifact_dir is None:
            return []
        return [p for p in sorted(self.artifact_dir.iterdir()) if p.is_file() and p.name != METADATA_FILE]

    def versions(self) -> dict[str, str]:
        """Library versions that produced/run this engine (part of the cache key)."""
        return {"python": platform.python_version()}

    def describe(self) -> dict[str, Any]:
        """Precision, bytes on disk, device, versions and backend-specific details."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "bytes_on_disk": sum(p.stat().st_size for p in self.artifact_files()),
            "versions": self.versions(),
            "artifact_dir": str(self.artifact_dir) if self.artifact_dir else None,
            "cache": self.cache_status,
            **{
                k: v
                for k, v in self.build_report.items()
                if k in ("kept_in_higher_precision", "accuracy_guard", "kernels")
            },
        }

    def predictor(self) -> Callable[[Any], Any]:
        """A callable for MONAI ``sliding_window_inference`` (torch tensor in, torch tensor out)."""
        import torch

        def predict(batch: torch.Tensor) -> torch.Tensor:
            logits = self.run(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))
            return torch.from_numpy(logits)

        return predict


def as_samples(windows: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """``C, D, H, W`` float32 samples of an ``N, C, D, H, W`` array or of a sequence of samples."""
    samples = [np.ascontiguousarray(w, dtype=np.float32) for w in windows]
    if (isinstance(windows, np.ndarray) and windows.ndim != 5) or any(s.ndim != 4 for s in samples):
        shape = windows.shape if isinstance(windows, np.ndarray) else [s.shape for s in samples]
        raise ValueError(f"expected windows N, C, D, H, W; got shape {shape}")
    return samples


def _progress(progress: Progress | None) -> Progress:
    return progress if progress is not None else SilentProgress()
