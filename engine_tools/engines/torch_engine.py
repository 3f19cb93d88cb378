"""PyTorch FP32 reference engine: the network exactly as published, run eagerly.

Its artifact is a ``torch.jit`` trace-free ``state_dict`` plus nothing else: the module itself is
rebuilt from the model card (``BuildRequest.torch_module_factory``), so this engine needs the factory
both at build and at load time (:meth:`TorchEngine.attach_factory`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.engines.base import SLAB_BYTES, BuildRequest, Engine
from engine_tools.progress import Progress

WEIGHTS_FILE = "model.pt"


class TorchEngine(Engine):
    backend = "torch"
    supported_precisions = ("fp32", "bf16")
    any_spatial_shape = True

    def __init__(self, precision: str = "fp32", device: str | None = None) -> None:
        super().__init__(precision, device)
        self._factory: Callable[[], Any] | None = None
        self._module: Any = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import torch
        except ImportError as exc:
            return False, f"PyTorch is not installed ({exc}); pip install torch"
        return True, f"torch {torch.__version__}"

    def versions(self) -> dict[str, str]:
        import torch

        return {**super().versions(), "torch": torch.__version__}

    def attach_factory(self, factory: Callable[[], Any]) -> None:
        """Give the engine the callable that rebuilds the network (needed before :meth:`load`)."""
        self._factory = factory

    def build(
        self, request: BuildRequest, artifact_dir: Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        import torch

        if request.torch_module_factory is None:
            raise ValueError(
                f"{request.model_id}: the PyTorch engine needs a PyTorch network (this model is ONNX-only)"
            )
        self._factory = request.torch_module_factory
        module = self._factory()
        torch.save(module.state_dict(), Path(artifact_dir) / WEIGHTS_FILE)
        return {"weights_file": WEIGHTS_FILE}

    def load(self, artifact_dir: Path) -> None:
        import torch

        if self._factory is None:
            raise RuntimeError("TorchEngine.load needs attach_factory() first (the card's network builder)")
        module = self._factory()
        state = torch.load(Path(artifact_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self._module = module.to(device=self.device, dtype=dtype).eval()
        self._dtype = dtype
        self.artifact_dir = Path(artifact_dir)

    def run(self, windows: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._forward(windows).float().cpu().numpy()

    def run_labels(self, volume: np.ndarray) -> tuple[np.ndarray, int]:
        """The arg-max over classes taken by PyTorch on its own logits (first on ties, as NumPy): no
        float copy of a whole volume's logits (7 GB for 104 classes over 256^3 voxels) leaves PyTorch."""
        import torch

        with torch.inference_mode():
            split = pointwise_split(self._module)
            if split is None:
                logits = self._forward(volume)
                classes, labels = int(logits.shape[1]), torch.argmax(logits, dim=1)
                del logits
            else:  # the hidden layers whole, the pointwise head slab by slab into its arg-max
                body, head = split
                hidden = body(self._tensor(volume))
                classes = head_channels(head)
                step = max(1, SLAB_BYTES // (4 * classes * hidden[0, 0, 0].numel()))
                parts = range(0, hidden.shape[2], step)  # each slab's logits dropped once arg-maxed
                labels = torch.cat(
                    [torch.argmax(head(hidden[:, :, i : i + step]), dim=1) for i in parts], dim=1
                )
            return labels.to(torch.uint8 if classes <= 256 else torch.int32).cpu().numpy(), classes

    def _forward(self, batch: np.ndarray) -> Any:
        """The module's output tensor for an ``N, C, D, H, W`` array (call inside inference mode)."""
        return self._module(self._tensor(batch))

    def _tensor(self, batch: np.ndarray) -> Any:
        import torch

        if self._module is None:
            raise RuntimeError("engine not loaded")
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, self._dtype)


#: Ops a pointwise head may hold besides its 1x1x1 convolution (each output voxel reads one input voxel).
POINTWISE_MODULES = ("ReLU", "ELU", "Sigmoid", "Identity", "Dropout", "Dropout3d")


def _pointwise(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Conv3d):
        return (
            set(module.kernel_size) == {1}
            and set(module.stride) == {1}
            and module.padding in ((0, 0, 0), "valid")
        )
    if isinstance(module, torch.nn.Softmax):
        return module.dim == 1
    return type(module).__name__ in POINTWISE_MODULES


def pointwise_split(module: Any) -> tuple[Any, Any] | None:
    """``(body, head)`` of an ``nn.Sequential`` ending in a pointwise head (a 1x1x1 convolution and
    what follows it), as :mod:`engine_tools.engines.openvino.class_outputs` splits an OpenVINO model;
    None for other modules. A whole 256^3 volume of brainchop model21 then never holds its 7 GB of
    logits (PyTorch FP32 crashed writing them on a 24 GB machine)."""
    import torch

    if not isinstance(module, torch.nn.Sequential):
        return None
    layers = list(module)
    start = len(layers)
    while start > 0 and _pointwise(layers[start - 1]):
        start -= 1
        if isinstance(layers[start], torch.nn.Conv3d):
            return (module[:start], module[start:]) if start > 0 else None
    return None


def head_channels(head: Any) -> int:
    """Output channels of a pointwise head (those of its convolution)."""
    import torch

    return next(m.out_channels for m in head if isinstance(m, torch.nn.Conv3d))
