"""Resampling cards preprocessed with SimpleITK (engine_tools.fast_resample) give MONAI's grid and
values, the partition-based quantiles equal ``np.quantile`` bit for bit, and deepbet's one-window
volume segments without PyTorch or MONAI.

Measured against the MONAI path: deepbet-brain on t1_crop / mni152 (0.65 mm, 393^3 / 296x352x296 grids
cropped to 256^3) differ by at most 2.1e-5 / 2.4e-5 after the 0..1 normalisation, the quantiles by
< 1e-6 relative; the synthetic noise volumes below by at most 1.9e-5 (the ``none`` rule: 8.5e-4 on
values of about 150). MONAI interpolates in float32, ITK in float64."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import OBLIQUE, rotation
from shared_data import shared_path

from engine_tools import fast_resample, volumes
from engine_tools.conformed import linear_quantiles
from engine_tools.engines.base import Engine
from engine_tools.geometry import ras_affine
from engine_tools.registry import get_card
from engine_tools.segment import segment_image

#: Largest difference from the MONAI path after normalisation to 0..1 (measured: 2.4e-5)
VALUE_TOL = 1e-4
#: Relative difference of the quantile rule's a_min / a_max (measured: < 1e-6)
RANGE_RTOL = 1e-5


def _t1() -> Path:
    return shared_path("data", "mri", "t1_crop.nii.gz")


def _monai(image: sitk.Image, card: object) -> volumes.Preprocessed:
    with mock.patch.object(volumes, "preprocess_with_resampling", return_value=None):
        return volumes.preprocess(image, card)


def _resampled(image: sitk.Image, card: object) -> tuple[volumes.Preprocessed, int]:
    """The SimpleITK path's result and how often it resampled."""
    with mock.patch.object(fast_resample, "resample_border", wraps=fast_resample.resample_border) as resample:
        prep = volumes.preprocess(image, card)
    return prep, resample.call_count


def _assert_same(fast: volumes.Preprocessed, reference: volumes.Preprocessed, scale: float = 1.0) -> None:
    assert fast.array.shape == reference.array.shape and fast.array.dtype == np.float32
    np.testing.assert_allclose(fast.affine, reference.affine, rtol=0, atol=1e-6)
    difference = float(np.abs(fast.array - reference.array).max())
    assert difference < VALUE_TOL * scale, difference
    used, expected = fast.steps.pop("intensity"), reference.steps.pop("intensity")
    assert used.keys() == expected.keys() and used["rule"] == expected["rule"]
    for key in ("a_min", "a_max"):
        if key in used:
            assert used[key] == pytest.approx(expected[key], rel=RANGE_RTOL, abs=1e-9), key
    assert fast.steps == reference.steps


@pytest.mark.parametrize("scan", ["t1_crop.nii.gz", "mni152_2009_t1.nii.gz"])
def test_deepbet_scan_matches_the_monai_path(scan: str) -> None:
    image = sitk.ReadImage(str(shared_path("data", "mri", scan)))
    card = get_card("deepbet-brain")  # RAS, 0.65 mm, 256^3, quantiles 0.5..99.5 %
    fast, resampled = _resampled(image, card)
    assert resampled == 1 and fast.spatial_shape == (256, 256, 256)
    _assert_same(fast, _monai(image, card))


def _noise_image(
    size: tuple[int, int, int], spacing: tuple[float, ...], direction: tuple[float, ...]
) -> sitk.Image:
    """Noise plus a ramp (the hardest case for interpolation) on the given grid."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 60, size[0], dtype=np.float32)
    values = rng.normal(100, 30, size=size[::-1]).astype(np.float32) + ramp
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin((12.0, -20.5, 7.25))
    image.SetDirection(direction)
    return image


def _flipped(*signs: float) -> tuple[float, ...]:
    return tuple(np.diag(signs).ravel().tolist())


QUANTILE = {"rule": "quantile", "lower": 0.5, "upper": 99.5}
WINDOW = {"rule": "window", "a_min": 60.0, "a_max": 150.0, "b_min": -1.0, "b_max": 1.0}
CASES = {
    # oblique: the grid keeps the input's rotation, permuted and flipped to the card's orientation
    "oblique_anisotropic": (OBLIQUE, (1.2, 0.9, 2.5), "RAS", [0.65, 0.65, 0.65], None, QUANTILE),
    "oblique_45deg_lia": (
        rotation((0.0, 45.0, 0.0)),
        (1.3, 1.0, 0.7),
        "LIA",
        [1.0, 1.0, 1.0],
        [32, 90, 40],
        QUANTILE,
    ),
    # the rounded-up grid ends beyond the input's last voxel by more than half a voxel: edge values
    "oblique_downsampled": (OBLIQUE, (1.0, 1.0, 1.0), "RAS", [1.5, 1.5, 2.0], None, {"rule": "none"}),
    # axis-aligned, flipped, anisotropic: crop on one axis, pad on the others
    "flipped_anisotropic": (
        _flipped(1, -1, -1),
        (1.2, 0.9, 2.5),
        "LIA",
        [1.0, 1.5, 0.8],
        [40, 64, 64],
        WINDOW,
    ),
    "no_orientation": (_flipped(-1, 1, 1), (0.8, 1.1, 3.0), None, [1.0, 1.0, 1.0], [24, 40, 64], QUANTILE),
}


@pytest.mark.parametrize("case", CASES)
def test_synthetic_grids_match_the_monai_path(case: str) -> None:
    direction, spacing, code, target, shape, rule = CASES[case]
    image = _noise_image((40, 50, 30), spacing, direction)
    card = {
        "preprocessing": {"orientation": code, "spacing": target, "shape": shape, "intensity": rule},
        "network": {"in_channels": 1},
    }
    fast, resampled = _resampled(image, card)
    assert resampled == 1
    reference = _monai(image, card)
    _assert_same(fast, reference, scale=200.0 if rule["rule"] == "none" else 1.0)
    if case == "oblique_downsampled":  # the border rule beyond ITK's half voxel was exercised
        corners = np.ones((4, 8))
        corners[:3] = np.array(list(itertools.product(*[(0, n - 1) for n in fast.spatial_shape]))).T
        index = (np.linalg.solve(ras_affine(image), fast.affine) @ corners)[:3]
        assert (index.max(axis=1) > np.array(image.GetSize()) - 0.5).any()


def test_a_spacing_within_monais_tolerance_is_not_resampled() -> None:
    image = _noise_image((40, 50, 30), (1.2, 0.9, 2.5), _flipped(1, 1, 1))  # LPS
    card = {  # in LIA the spacing is (1.2, 2.5, 0.9); 0.9005 is within MONAI's 1e-3 mm
        "preprocessing": {"orientation": "LIA", "spacing": [1.2, 2.5, 0.9005], "intensity": QUANTILE},
        "network": {"in_channels": 1},
    }
    fast, resampled = _resampled(image, card)
    assert resampled == 0
    reference = _monai(image, card)
    np.testing.assert_array_equal(fast.array, reference.array)
    assert fast.steps == reference.steps


@pytest.mark.parametrize(
    "change",
    [
        {"intensity": {"rule": "zscore"}},
        {"crop_foreground": {"threshold": 0}},
        {"intensity": {**QUANTILE, "then_scale": {"b_min": -1, "b_max": 1}}},
        {"intensity": {"rule": "window"}},  # incomplete: the MONAI path explains it
        {"spacing": [1.0, 1.0]},
    ],
)
def test_other_preprocessing_is_left_to_monai(change: dict) -> None:
    spec = {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": QUANTILE, **change}
    steps: dict = {}
    data = np.zeros((1, 4, 4, 4), np.float32)
    assert fast_resample.preprocess_with_resampling(data, np.eye(4), spec, 1, steps) is None
    assert steps == {}
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    spec = {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": QUANTILE}
    assert fast_resample.preprocess_with_resampling(data, sheared, spec, 1, steps) is None


class _Threshold:
    """A stand-in engine: two logits per voxel, ``x - 0.5`` for the second class (numpy only)."""

    def run(self, windows: np.ndarray) -> np.ndarray:
        return np.concatenate([0.5 - windows, windows - 0.5], axis=1).astype(np.float32)

    predictor = Engine.predictor  # the torch wrapper the sliding-window path uses


def test_deepbet_segments_one_window_without_torch_or_monai() -> None:
    """A cached engine segments deepbet's 256^3 volume (one window) with SimpleITK and numpy only."""
    code = (
        "import sys, json\n"
        "import numpy as np\n"
        "from engine_tools.registry import get_card\n"
        "from engine_tools.segment import segment_image\n"
        "class Threshold:\n"
        "    def run(self, windows):\n"
        "        return np.concatenate([0.5 - windows, windows - 0.5], axis=1).astype(np.float32)\n"
        f"result = segment_image(Threshold(), get_card('deepbet-brain'), {str(_t1())!r})\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'nibabel') if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'windows': result.timings['num_windows']}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"heavy": [], "windows": 1}


def test_one_window_labels_equal_the_sliding_window_path() -> None:
    image = sitk.ReadImage(str(_t1()))
    card, engine = get_card("deepbet-brain"), _Threshold()
    prep = volumes.preprocess(image, card)
    numpy_path = segment_image(engine, card, prep)  # type: ignore[arg-type]
    torch_path = segment_image(engine, card, prep, predictor=engine.predictor())  # type: ignore[arg-type]
    assert numpy_path.timings["num_windows"] == torch_path.timings["num_windows"] == 1
    np.testing.assert_array_equal(numpy_path.network_labels, torch_path.network_labels)
    assert 0 < numpy_path.network_labels.sum() < numpy_path.network_labels.size


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    arrays = [
        np.array([5.0], np.float32),
        np.array([2.0, -1.0], np.float32),
        np.full(17, 3.25, np.float32),  # constant
        np.full((4, 5, 6), 0.0, np.float32),
        rng.integers(0, 4, size=1001).astype(np.float32),  # many ties
        rng.integers(-300, 300, size=(13, 7, 11)).astype(np.int16),
        rng.integers(0, 255, size=(20, 20, 20)).astype(np.uint8),
        rng.normal(size=(33, 17, 9)).astype(np.float32),
        rng.normal(size=5000),
        rng.normal(size=(12, 10, 8)).astype(np.float32).transpose(2, 0, 1),  # not C-contiguous
    ]
    return arrays + [rng.exponential(size=int(n)).astype(np.float32) for n in rng.integers(1, 400, size=40)]


@pytest.mark.parametrize(
    "quantiles",
    [[0.005, 0.995], [0.02, 0.98], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75], [0.999999, 1e-7], [0.3]],
)
def test_linear_quantiles_equal_numpy_bit_for_bit(quantiles: list[float]) -> None:
    for array in _arrays():
        expected = np.quantile(array, quantiles)
        got = linear_quantiles(array, quantiles)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (array.shape, quantiles)


def test_linear_quantiles_edge_cases() -> None:
    values = np.array([1.0, np.nan, 3.0, 2.0], np.float32)
    assert (
        np.isnan(linear_quantiles(values, [0.1, 0.5])).all()
        and np.isnan(np.quantile(values, [0.1, 0.5])).all()
    )
    with pytest.raises(ValueError, match="empty"):
        linear_quantiles(np.zeros(0, np.float32), [0.5])
    with pytest.raises(ValueError, match="range"):
        linear_quantiles(np.ones(3, np.float32), [1.5])
    array = np.arange(10, dtype=np.float32)
    before = array.copy()
    linear_quantiles(array, [0.3, 0.7])
    np.testing.assert_array_equal(array, before)  # the input is not reordered
