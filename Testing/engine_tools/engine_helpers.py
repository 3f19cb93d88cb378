"""Shared set-up of the engine tests: real brainchop cards at small windows and real T1 windows."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from engine_tools.registry import ModelCard, get_card


def small_card(model_id: str, window: int) -> ModelCard:
    """The real card with a smaller (cubic) window so CI stays fast; everything else unchanged."""
    card = get_card(model_id)
    raw = {**card.raw, "window": {**card.raw["window"], "size": [window] * 3}}
    return ModelCard.from_dict(raw, card.path)


@lru_cache(maxsize=4)
def _network_volume(scan: str, card_id: str) -> np.ndarray:
    from engine_tools.volumes import preprocess

    return preprocess(scan, get_card(card_id)).array


def foreground_windows(scan: Path, card: ModelCard, count: int, seed: int) -> np.ndarray:
    """``count`` windows (card window size) centred on random foreground voxels of a real scan."""
    volume = _network_volume(str(scan), card.id)
    size = np.array(card.window_size)
    inside = np.argwhere(volume[0] > 0.2)
    rng = np.random.default_rng(seed)
    out = []
    for centre in inside[rng.choice(len(inside), size=count, replace=False)]:
        start = np.clip(centre - size // 2, 0, np.array(volume.shape[1:]) - size)
        out.append(
            volume[
                :, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]
            ]
        )
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)
