"""Shared set-up of the engine tests: real brainchop cards at small windows and real T1 windows."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from engine_tools.calibration import CalibrationSet
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


def calibration_set(scan: Path, card: ModelCard, count: int, seed: int) -> CalibrationSet:
    """:func:`foreground_windows` as the calibration set :func:`prepare_engine` takes."""
    return CalibrationSet.from_windows(foreground_windows(scan, card, count, seed), source=Path(scan).name)


def head_crops(array: np.ndarray, window: tuple[int, int, int], count: int, seed: int) -> np.ndarray:
    """``count`` crops of ``window`` inside the head (centre region of a conformed ``C, D, H, W`` volume)."""
    rng = np.random.default_rng(seed)
    _, *shape = array.shape
    crops = []
    for _ in range(count):
        z, y, x = (int(rng.integers(s // 4, 3 * s // 4 - w)) for s, w in zip(shape, window, strict=True))
        crops.append(array[:, z : z + window[0], y : y + window[1], x : x + window[2]])
    return np.ascontiguousarray(np.stack(crops), dtype=np.float32)


def meshnet_case(folder: Path, window: tuple[int, int, int]) -> dict:
    """The pretrained brainchop MeshNet ``model18cls`` (21-channel dilated convolutions, 18 labels) as an
    ONNX narrowed to ``window``, with 12 calibration and 4 held-out crops of the real T1 after the
    card's preprocessing (skips when ``../shared`` is absent)."""
    import pytest
    from shared_data import shared_path

    from engine_tools.engines.tensorrt.modelopt_qdq import set_static_window
    from engine_tools.networks import export_onnx
    from engine_tools.volumes import preprocess, read_image

    brainchop = shared_path("models", "brainchop")
    t1 = shared_path("data", "mri", "t1_crop.nii.gz")
    card = get_card("brainchop-model18cls")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDQUANT_CACHE_DIR", str(folder / "cache"))
        full = export_onnx(card, weights_dir=brainchop / "model18cls")
    size = "x".join(map(str, window))
    onnx_path = set_static_window(full, folder / f"model18cls_{size}.onnx", window)
    array = preprocess(read_image(t1), card).array
    return {
        "onnx": onnx_path,
        "folder": folder,
        "calibration": head_crops(array, window, 12, seed=0),
        "holdout": head_crops(array, window, 4, seed=1),
    }
