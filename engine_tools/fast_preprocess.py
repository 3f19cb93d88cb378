"""Card preprocessing with numpy only, for the common case, so that segmenting with a cached engine
needs neither PyTorch nor MONAI.

:func:`engine_tools.volumes.preprocess` calls :func:`preprocess_without_monai` when the scan is not
already conformed (:mod:`engine_tools.conformed`). It handles
inputs whose axes are aligned with the world axes and already sampled at the card's spacing (such as
1 mm conformed T1 scans), and cards whose steps are a reorientation, a ``quantile``/``window``/``none``
intensity rule and a centred pad or crop to ``shape``. It does what MONAI's ``Orientation``,
``ScaleIntensityRange`` and ``ResizeWithPadOrCrop`` do (the same array and affine; tested against the
MONAI path). Anything else returns ``None``: resampling goes to :mod:`engine_tools.fast_resample`
(SimpleITK), foreground crop and z-score to the MONAI path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine_tools.conformed import scale_range

_WORLD_AXIS = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "I": (2, -1), "S": (2, 1)}
_LETTERS = {(0, -1): "L", (0, 1): "R", (1, -1): "P", (1, 1): "A", (2, -1): "I", (2, 1): "S"}
_SIMPLE_RULES = ("quantile", "window", "none")


def axis_code(affine: np.ndarray) -> str | None:
    """nibabel-style axis code (e.g. ``"LIA"``) of an axis-aligned grid; ``None`` when oblique."""
    axes = aligned_axes(affine)
    return None if axes is None else "".join(_LETTERS[a] for a in axes)


def aligned_axes(affine: np.ndarray, tolerance: float = 1e-6) -> list[tuple[int, int]] | None:
    """``(world axis, sign)`` each voxel axis points along, or ``None`` for an oblique grid."""
    axes = []
    for column in affine[:3, :3].T:
        unit = column / np.linalg.norm(column)
        world = int(np.argmax(np.abs(unit)))
        if abs(abs(unit[world]) - 1.0) > tolerance:
            return None
        axes.append((world, 1 if unit[world] > 0 else -1))
    return axes if len({w for w, _ in axes}) == 3 else None


def _applies(spec: dict[str, Any], affine: np.ndarray, in_channels: int) -> bool:
    from engine_tools.volumes import _validated_code

    intensity = spec.get("intensity") or {"rule": "none"}
    if spec.get("orientation"):
        _validated_code(spec["orientation"])  # a bad code is the same error on either path
    if in_channels != 1 or spec.get("crop_foreground") or intensity.get("rule", "none") not in _SIMPLE_RULES:
        return False
    if intensity.get("then_scale") or aligned_axes(affine) is None:
        return False
    spacing = spec.get("spacing")
    if not spacing:
        return True
    wanted = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]
    # no resampling here: the spacing along each reoriented axis must already be the card's
    _, reoriented = reorient(np.zeros((1, 1, 1, 1), np.float32), affine, spec.get("orientation") or "")
    return bool(np.allclose(np.linalg.norm(reoriented[:3, :3], axis=0), wanted, rtol=1e-6, atol=0))


def orientation_plan(
    affine: np.ndarray, shape: tuple[int, ...], code: str, source: list[tuple[int, int]] | None = None
) -> tuple[list[int], list[bool], np.ndarray]:
    """Axis order, flips and RAS affine that bring a grid of ``shape`` to point as ``code`` says
    (nibabel's ornt_transform / inv_ornt_aff, as MONAI's ``Orientation``). ``source``: where each
    voxel axis points (:func:`aligned_axes`; nibabel's ``io_orientation`` for an oblique grid)."""
    source = source or aligned_axes(affine)
    if source is None:
        raise ValueError("reorient needs a grid aligned with the world axes")
    if not code:
        code = "".join(_LETTERS[a] for a in source)
    order, flips = [], []
    for letter in code:
        world, sign = _WORLD_AXIS[letter]
        axis = next(i for i, (w, _) in enumerate(source) if w == world)
        order.append(axis)
        flips.append(source[axis][1] != sign)
    out = np.eye(4)
    out[:3, 3] = affine[:3, 3]
    for target, (axis, flip) in enumerate(zip(order, flips, strict=True)):
        column = affine[:3, axis]
        if flip:
            out[:3, 3] += column * (shape[axis] - 1)
            column = -column
        out[:3, target] = column
    return order, flips, out


def reorient(
    array: np.ndarray, affine: np.ndarray, code: str, source: list[tuple[int, int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(C, D, H, W)`` array and RAS affine permuted and flipped so that the axes point as ``code``
    says (:func:`orientation_plan`)."""
    order, flips, out = orientation_plan(affine, array.shape[1:], code, source)
    array = array.transpose(0, *(a + 1 for a in order))
    flipped = tuple(target + 1 for target, flip in enumerate(flips) if flip)
    if flipped:
        array = np.flip(array, axis=flipped)
    return np.ascontiguousarray(array), out


def pad_or_crop(array: np.ndarray, affine: np.ndarray, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Centred zero pad / crop of ``(C, D, H, W)`` to ``shape`` (MONAI ``ResizeWithPadOrCrop``)."""
    affine = affine.copy()
    for axis, size in enumerate(shape):
        current = array.shape[axis + 1]
        if current > size:
            start = current // 2 - size // 2
            array = np.take(array, range(start, start + size), axis=axis + 1)
            affine[:3, 3] += affine[:3, axis] * start
        elif current < size:
            before = (size - current) // 2
            pads = [(0, 0)] * 4
            pads[axis + 1] = (before, size - current - before)
            array = np.pad(array, pads)
            affine[:3, 3] -= affine[:3, axis] * before
    return array, affine


def preprocess_without_monai(
    data: np.ndarray, affine: np.ndarray, spec: dict[str, Any], in_channels: int, steps: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(array, RAS affine)`` of ``data`` ``(C, D, H, W)`` in the card's network space (``steps``
    records what was done), or ``None`` when this case needs the MONAI path."""
    if not _applies(spec, affine, in_channels):
        return None
    if spec.get("orientation"):
        steps["orientation"] = str(spec["orientation"]).upper()
        data, affine = reorient(data, affine, steps["orientation"])
    if spec.get("spacing"):
        spacing = spec["spacing"]
        steps["spacing"] = [float(s) for s in ([spacing] * 3 if np.isscalar(spacing) else spacing)]
    rule = spec.get("intensity") or {"rule": "none"}
    if rule.get("rule", "none") != "none":
        data, steps["intensity"] = scale_range(data, rule)
    else:
        steps["intensity"] = {"rule": "none"}
    shape = spec.get("shape")
    if shape:
        steps["shape"] = [int(s) for s in ([shape] * 3 if np.isscalar(shape) else shape)]
        data, affine = pad_or_crop(data, affine, steps["shape"])
    return np.ascontiguousarray(data, dtype=np.float32), affine
