"""Preprocessing without PyTorch for a scan already in the card's network space.

A conformed scan (e.g. FreeSurfer-style 256^3, 1 mm, LIA for the brainchop MeshNets) needs no
reorientation, resampling or padding: the MONAI transforms would copy it unchanged. Only the intensity
rule applies, and for the ``quantile`` and ``window`` rules that is a few numpy operations. Skipping
MONAI here also skips importing PyTorch and MONAI, several seconds of a segmentation's start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from engine_tools.geometry import orientation_code

#: Intensity rules computed here exactly as MONAI's ``ScaleIntensityRange`` does
FAST_RULES = ("quantile", "window")


def already_conformed(image: sitk.Image, spec: dict[str, Any]) -> bool:
    """True when ``image`` has the card's axis-aligned orientation, spacing and shape (no resampling),
    and its intensity rule is one of :data:`FAST_RULES`."""
    rule = spec.get("intensity") or {"rule": "none"}
    if rule.get("rule", "none") not in FAST_RULES or rule.get("then_scale") or spec.get("crop_foreground"):
        return False
    code, spacing, shape = spec.get("orientation"), spec.get("spacing"), spec.get("shape")
    if not (code and spacing and shape):
        return False
    direction = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    if not np.allclose(direction, np.round(direction), atol=1e-6):
        return False  # oblique: Orientation alone would not align it
    wanted = [float(s) for s in ([spacing] * 3 if np.isscalar(spacing) else spacing)]
    size = [int(s) for s in ([shape] * 3 if np.isscalar(shape) else shape)]
    return (
        orientation_code(image) == str(code).upper()
        and np.allclose(image.GetSpacing(), wanted, rtol=0, atol=1e-5)
        and list(image.GetSize()) == size
    )


def linear_quantiles(array: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """``np.quantile(array, quantiles)`` (default ``linear`` method, over all of ``array``) bit for bit
    (a zero's sign aside), from one ``np.partition`` of one flattened copy (in memory order, no
    transposing copy) over just the order statistics it interpolates."""
    flat = np.asarray(array).ravel(order="K")
    count = flat.size
    wanted = np.asarray(quantiles, dtype=np.float64)
    if count == 0:
        raise ValueError("quantiles of an empty array")
    if not ((wanted >= 0) & (wanted <= 1)).all():
        raise ValueError("Quantiles must be in the range [0, 1]")
    position = (count - 1) * wanted
    below = np.floor(position)
    above = below + 1
    at_end = position >= count - 1  # numpy takes the last value there (index -1 on both sides)
    below[at_end], above[at_end] = -1, -1
    gamma = position - below
    below_index, above_index = below.astype(np.intp), above.astype(np.intp)
    kth = np.unique(np.concatenate((below_index, above_index)) % count)
    ordered = np.partition(flat, kth)
    if ordered.dtype.kind == "f" and np.isnan(ordered[kth[-1] :]).any():  # NaN sorts last
        return np.full(wanted.shape, np.nan)
    low, high = ordered[below_index], ordered[above_index]
    step = high - low
    result = low + step * gamma  # numpy's lerp: from the nearer end, in float64
    np.subtract(high, step * (1 - gamma), out=result, where=gamma >= 0.5)
    return result


def quantile_range(array: np.ndarray, rule: dict[str, Any]) -> tuple[float, float]:
    """``(a_min, a_max)`` of the ``quantile`` rule: the ``lower``/``upper`` quantiles (fractions, or
    percentiles when above 1) of ``array``, widened to a range of 1 when the volume is constant."""
    lower, upper = float(rule.get("lower", 0.02)), float(rule.get("upper", 0.98))
    if lower > 1 or upper > 1:  # given as percentiles
        lower, upper = lower / 100, upper / 100
    a_min, a_max = (float(v) for v in linear_quantiles(array, [lower, upper]))
    return a_min, (a_max if a_max > a_min else a_min + 1.0)


def scale_range(
    array: np.ndarray, rule: dict[str, Any], limits: tuple[float, float] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``quantile`` or ``window`` rule: ``a_min..a_max`` to ``b_min..b_max`` (clipped), float32.
    ``limits`` gives the quantile rule's ``(a_min, a_max)`` when computed over another array."""
    b_min, b_max = float(rule.get("b_min", 0.0)), float(rule.get("b_max", 1.0))
    if rule["rule"] == "quantile":
        a_min, a_max = limits if limits is not None else quantile_range(array, rule)
    else:
        a_min, a_max = float(rule["a_min"]), float(rule["a_max"])
    scaled = (array - np.float32(a_min)) / np.float32(a_max - a_min)
    scaled = scaled * np.float32(b_max - b_min) + np.float32(b_min)
    if bool(rule.get("clip", True)):
        np.clip(scaled, b_min, b_max, out=scaled)
    return scaled.astype(np.float32, copy=False), {"rule": rule["rule"], "a_min": a_min, "a_max": a_max}
