"""Loading published checkpoints into the zoo networks without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Keys under which the publishers store the state dict (MONAI bundles store it bare).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "network_weights", "model")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def _numpy_scalar_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must accept to read numpy scalars and their dtypes.

    nnU-Net checkpoints log losses and Dice as numpy scalars (``np.float64``), which the restricted
    unpickler refuses by default (MIC-DKFZ/nnUNet#2681). Allowing these reconstructors only rebuilds
    numbers; nothing else becomes loadable. Files written under numpy 1 name ``numpy.core``.
    """
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = {type(np.dtype(code)) for code in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")}
    dtype_classes |= {type(np.dtype(code)) for code in ("f2", "f4", "f8")}
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *sorted(dtype_classes, key=str)]


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts numpy scalars: never a plain unpickle."""
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(
    path: str | Path, key: str | None = None, strip_prefix: str | None = "module."
) -> dict[str, Any]:
    """Tensors of a checkpoint read with ``torch.load(weights_only=True)`` (numpy scalars allowed).

    ``key`` selects a nested state dict (e.g. ``"model_state_dict"``, nnU-Net's ``"network_weights"``);
    without it the usual keys are tried. ``strip_prefix`` removes a DataParallel/DDP ``module.`` prefix.
    """
    path = Path(path)
    try:
        loaded = safe_load(path)
    except Exception as exc:  # pickle refusing a non-tensor object, truncated file, ...
        raise CheckpointError(
            f"{path}: cannot be read safely with torch.load(weights_only=True) ({exc}). "
            "Convert it once, in an environment you trust, to a plain state_dict "
            "(torch.save(model.state_dict(), 'model.pt'))."
        ) from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path}: expected a state dict (mapping of tensors), found {type(loaded).__name__}"
        )
    if key is not None:
        if key not in loaded:
            raise CheckpointError(f"{path}: no '{key}' entry (has: {', '.join(map(str, list(loaded)[:8]))})")
        loaded = loaded[key]
    elif not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for candidate in STATE_DICT_KEYS:
            if isinstance(loaded.get(candidate), dict):
                loaded = loaded[candidate]
                break
    state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if strip_prefix and all(k.startswith(strip_prefix) for k in state):
        state = {k[len(strip_prefix) :]: v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"{path}: contains no tensors")
    return state


def load_checkpoint(
    module: nn.Module, path: str | Path, key: str | None = None, strip_prefix: str | None = "module."
) -> nn.Module:
    """Load ``path`` into ``module`` strictly; mismatches raise :class:`CheckpointError` naming the keys."""
    state = read_state_dict(path, key, strip_prefix)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not match the card's network configuration: {exc}") from exc
    return module.eval()
