"""Deterministic weights and inputs shared by the reference scripts in this folder and their tests.

Values are drawn per parameter *name* (a numpy generator seeded by the name's CRC-32), so two
implementations with the same state-dict keys and shapes receive identical weights, whatever their
construction order or library version.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def publisher_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for ``module``: parameters drawn per name, buffers kept as the module made them."""
    state = dict(module.state_dict())
    for name, parameter in module.named_parameters():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        shape = tuple(parameter.shape)
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) > 1:
            values = noise / np.sqrt(np.prod(shape[1:]))
        elif "norm" in name and name.endswith("weight"):
            values = 1.0 + 0.1 * noise
        else:
            values = 0.1 * noise
        state[name] = torch.from_numpy(values.astype(np.float32))
    return state


def seeded_input(window: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A ``1, 1, *window`` input of uniform values in [0, 1)."""
    return torch.from_numpy(np.random.default_rng(seed).random((1, 1, *window), dtype=np.float32))
