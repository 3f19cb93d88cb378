"""Scanner-variation copies of calibration samples: the accuracy guard's stand-in for unseen subjects.

When calibration used every scan of the folder (a single scan), the guard can only validate on data
calibration saw, and INT8 agrees best with FP32 on exactly that data. Scans from other subjects and
scanners differ above all in contrast and sharpness, so the guard also validates on copies of the
scan that differ in those ways:

* contrast: a gamma of 0.7 and of 1.4 over the sample's own intensity range (the range, and so any
  normalisation the card applied, is kept);
* sharpness: a Gaussian blur of one voxel (a softer scan: an older sequence, thicker slices, an
  average template).

The guard's estimate is its agreement over the sample and its copies together. Measured on the
brainchop MeshNets (``bench/results/guard_variations.md``): on the calibration scan alone the estimate
was up to 0.015 above the agreement on unseen subjects, over the scan and these copies up to 0.010;
the guard at target 0.98 then reached 0.98 on 7 of 8 unseen subjects (0.975 on the eighth). It is
still no unseen subject, and the build report says so.

Whole volumes are cut to their centred ``crop``-voxel cube first (the guard runs every copy, FP32 and
INT8, for every candidate); windows keep their shape (fixed-window engines run no other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from engine_tools.sensitivity import PROXY_CROP, centred_crop

#: centred cube whole-volume copies are cut to (voxels per axis): the guard's proxy crop, so a copy is its
#: own proxy and costs the guard no more than one proxy crop per candidate
VARIATION_CROP = PROXY_CROP
#: samples that get copies (the first ones; each copy costs the guard one more sample per candidate)
MAX_VARIED_SAMPLES = 2


def gamma(sample: np.ndarray, exponent: float) -> np.ndarray:
    """``sample`` with its contrast changed by ``exponent`` over its own [min, max] range."""
    low, high = float(np.min(sample)), float(np.max(sample))
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.array(sample, dtype=np.float32)
    scaled = (np.asarray(sample, dtype=np.float32) - low) / (high - low)
    return (low + (high - low) * np.power(scaled, exponent)).astype(np.float32)


def blurred(sample: np.ndarray, sigma: float) -> np.ndarray:
    """``sample`` (``C, D, H, W``) smoothed per channel by a Gaussian of ``sigma`` voxels."""
    import SimpleITK as sitk

    channels = []
    for channel in np.asarray(sample, dtype=np.float32):
        image = sitk.GetImageFromArray(channel)
        channels.append(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, float(sigma))))
    return np.stack(channels).astype(np.float32)


#: the copies, by name: gamma over the sample's intensity range, and a Gaussian blur (sigma in voxels)
VARIATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma 0.7": lambda s: gamma(s, 0.7),
    "gamma 1.4": lambda s: gamma(s, 1.4),
    "blurred 1 voxel": lambda s: blurred(s, 1.0),
}


def scanner_variations(
    samples: Sequence[np.ndarray], crop: int | None = VARIATION_CROP
) -> list[tuple[int, str, np.ndarray]]:
    """``(sample index, variation name, copy)`` for the first :data:`MAX_VARIED_SAMPLES` samples and
    every :data:`VARIATIONS` entry; ``crop`` (whole volumes) cuts each sample to its centred cube
    first, ``None`` keeps the shape (windows). The samples themselves are not changed."""
    copies = []
    for index, sample in enumerate(list(samples)[:MAX_VARIED_SAMPLES]):
        base = centred_crop(sample, crop) if crop else np.asarray(sample, dtype=np.float32)
        copies.extend((index, name, vary(base)) for name, vary in VARIATIONS.items())
    return copies


def describe(crop: int | None) -> str:
    """What the copies are, for the guard's report."""
    where = f", centred {crop}-voxel crops" if crop else ""
    return f"copies with scanner variations ({', '.join(VARIATIONS)}{where})"
