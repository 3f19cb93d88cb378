"""Scanner-variation copies the accuracy guard validates on when calibration used every scan."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from shared_data import shared_path

from engine_tools.scanner_variations import MAX_VARIED_SAMPLES, VARIATIONS, gamma, scanner_variations


def _head(size: int = 96) -> np.ndarray:
    """The centre of the shared T1 (intensities 0..1) as a ``1, D, H, W`` sample."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_path("data", "mri", "t1_crop.nii.gz"))))
    start = [(extent - size) // 2 for extent in array.shape]
    cube = array[tuple(slice(s, s + size) for s in start)].astype(np.float32)
    return (cube / cube.max())[None]


def _roughness(sample: np.ndarray) -> float:
    return float(np.mean([np.abs(np.diff(sample, axis=axis)).mean() for axis in (1, 2, 3)]))


def test_copies_change_contrast_and_sharpness_of_a_real_scan_and_leave_it_untouched() -> None:
    head = _head()
    samples = [head, head * 0.5, head]
    before = [s.copy() for s in samples]
    copies = scanner_variations(samples, crop=64)
    assert [(i, name) for i, name, _ in copies] == [
        (i, name) for i in range(MAX_VARIED_SAMPLES) for name in VARIATIONS
    ]
    for sample, kept in zip(samples, before, strict=True):
        np.testing.assert_array_equal(sample, kept)
    by_name = {name: copy for index, name, copy in copies if index == 0}
    centre = head[:, 16:80, 16:80, 16:80]
    for copy in by_name.values():
        assert copy.shape == (1, 64, 64, 64) and copy.dtype == np.float32 and np.isfinite(copy).all()
    # gamma keeps the intensity range (so any normalisation) and moves the mid-tones both ways
    for name in ("gamma 0.7", "gamma 1.4"):
        assert np.isclose(by_name[name].min(), centre.min()) and np.isclose(by_name[name].max(), centre.max())
    assert (
        by_name["gamma 0.7"].mean()
        > centre.mean() + 0.02
        > centre.mean()
        > by_name["gamma 1.4"].mean() + 0.02
    )
    # the blur keeps the mean intensity and removes fine detail
    blurred = by_name["blurred 1 voxel"]
    assert abs(float(blurred.mean()) - float(centre.mean())) < 0.01
    assert _roughness(blurred) < 0.7 * _roughness(centre)
    # windows keep their shape (no crop)
    assert {copy.shape for _, _, copy in scanner_variations([head], crop=None)} == {head.shape}


def test_gamma_of_a_constant_or_negative_range_sample() -> None:
    constant = np.full((1, 4, 4, 4), 3.0, np.float32)
    np.testing.assert_array_equal(gamma(constant, 0.7), constant)
    ct_like = np.linspace(-1.0, 2.0, 64, dtype=np.float32).reshape(1, 4, 4, 4)  # z-scored intensities
    copy = gamma(ct_like, 1.4)
    assert np.isfinite(copy).all() and np.isclose(copy.min(), -1.0) and np.isclose(copy.max(), 2.0)
    assert np.all(np.diff(copy.ravel()) >= 0)  # order of intensities is kept
