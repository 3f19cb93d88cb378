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


def read_state_dict(
    path: str | Path, key: str | None = None, strip_prefix: str | None = "module."
) -> dict[str, Any]:
    """Tensors of a checkpoint read with ``torch.load(weights_only=True)``.

    ``key`` selects a nested state dict (e.g. ``"model_state_dict"``, nnU-Net's ``"network_weights"``);
    without it the usual keys are tried. ``strip_prefix`` removes a DataParallel/DDP ``module.`` prefix.
    """
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
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
