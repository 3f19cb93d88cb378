"""Card preprocessing that resamples, without PyTorch or MONAI: SimpleITK's multithreaded linear
resampler on the grid MONAI's ``Spacing`` would produce.

:func:`engine_tools.volumes.preprocess` calls :func:`preprocess_with_resampling` when
:func:`~engine_tools.fast_preprocess.preprocess_without_monai` declines (the scan needs resampling, or
is oblique). It handles single-channel cards whose steps are an orientation, a spacing, a
``quantile``/``window``/``none`` intensity rule and a centred pad or crop to ``shape`` (no foreground
crop, no z-score), for inputs without shear; anything else returns ``None`` and the MONAI path runs.
What MONAI does there (``Orientation``, then ``Spacing(mode="bilinear", padding_mode="border")``, the
intensity rule over the whole resampled volume, then ``ResizeWithPadOrCrop``), done here:

* orientation: axes permuted and flipped (nibabel's ``io_orientation`` picks them for oblique grids);
* spacing: the grid keeps the rotation, its column norms become the card's spacing (an input spacing
  within 1e-3 mm of it is kept); the box spans the input's voxel centres, anchored at the input corner
  lowest along every output axis, else centred on the input; a grid that barely moves is not resampled;
* values: trilinear at the output voxel centres; outside the input the nearest edge value
  (``"border"``), by edge-padding the input as far as the output reaches;
* intensity quantiles over the whole resampled volume, then the centred pad (zeros) / crop.

The array equals the MONAI path's to float32 rounding (MONAI interpolates in float32, ITK in float64),
with the same shape and affine (tested in ``Testing/engine_tools/test_fast_resample.py``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import SimpleITK as sitk

from engine_tools.conformed import quantile_range, scale_range
from engine_tools.fast_preprocess import _SIMPLE_RULES, aligned_axes, orientation_plan, pad_or_crop, reorient
from engine_tools.geometry import geometry_from_affine

#: MONAI's ``AFFINE_TOL``: spacings and grids this close count as unchanged
AFFINE_TOL = 1e-3
#: Corner-anchoring tolerance of MONAI's ``compute_shape_offset`` (``np.allclose`` to 0: ``atol``)
_CORNER_TOL = 1e-8


def _triple(value: Any) -> list[float] | None:
    if value is None or (not np.isscalar(value) and len(value) != 3):
        return None
    return [float(v) for v in ([value] * 3 if np.isscalar(value) else value)]


def _applies(spec: dict[str, Any], affine: np.ndarray, in_channels: int) -> bool:
    intensity = spec.get("intensity") or {"rule": "none"}
    name = intensity.get("rule", "none")
    if in_channels != 1 or spec.get("crop_foreground") or intensity.get("then_scale"):
        return False
    if name not in _SIMPLE_RULES or (name == "window" and not {"a_min", "a_max"} <= intensity.keys()):
        return False
    spacing = _triple(spec.get("spacing")) if spec.get("spacing") else [1.0]
    if spacing is None or min(spacing) <= 0 or (spec.get("shape") and _triple(spec["shape"]) is None):
        return False
    gram = affine[:3, :3].T @ affine[:3, :3]  # no shear: orthogonal voxel axes
    return bool(np.allclose(gram, np.diag(np.diag(gram)), rtol=0, atol=1e-9 * float(np.abs(gram).max())))


def source_axes(affine: np.ndarray) -> list[tuple[int, int]]:
    """``(world axis, sign)`` each voxel axis is reoriented from (nibabel's ``io_orientation`` for an
    oblique grid, as MONAI's ``Orientation``; nibabel is imported only then)."""
    axes = aligned_axes(affine)
    if axes is not None:
        return axes
    import nibabel as nib

    return [(int(world), int(sign)) for world, sign in nib.io_orientation(affine)]


def spacing_grid(
    affine: np.ndarray, shape: tuple[int, ...], spacing: list[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and shape of the grid MONAI's ``Spacing`` (``diagonal=False``, no
    ``scale_extent``) resamples a ``shape`` grid on ``affine`` to."""
    linear = affine[:3, :3]
    current = np.linalg.norm(linear, axis=0)
    wanted = np.asarray(spacing, dtype=np.float64)
    wanted = np.where(np.abs(current - wanted) <= AFFINE_TOL, current, wanted)
    # rotation: the orthonormal factor of the linear part (QR with a positive diagonal)
    upper = np.linalg.cholesky(linear.T @ linear).T
    target = np.eye(4)
    target[:3, :3] = (linear @ np.linalg.inv(upper)) * wanted
    corners = np.ones((4, 8))
    corners[:3] = np.array(list(itertools.product(*[(0.0, n - 1.0) for n in shape]))).T
    placed = (np.linalg.solve(target, affine) @ corners)[:3]  # input corners in output voxels
    size = np.round(np.ptp(placed, axis=1) + 1.0)
    world = (affine @ corners)[:3]
    lowest = [i for i in range(8) if np.all(np.abs(placed.min(axis=1) - placed[:, i]) <= _CORNER_TOL)]
    if lowest:
        target[:3, 3] = world[:, lowest[0]]
    else:  # no corner is lowest along every axis: centre the output box on the input box
        shape_f = np.asarray(shape, dtype=np.float64)
        target[:3, 3] = linear @ (shape_f / 2.0) + affine[:3, 3] - target[:3, :3] @ (size / 2.0)
    return target, tuple(int(s) for s in size)  # type: ignore[return-value]


def _unchanged(source: np.ndarray, target: np.ndarray, shape: tuple[int, ...], size: tuple[int, ...]) -> bool:
    """MONAI skips resampling when the grids agree within ``AFFINE_TOL`` (and keeps the source affine)."""
    if tuple(shape) != tuple(size):
        return False
    step = np.linalg.solve(source, target)
    return bool(np.allclose(source, target, atol=AFFINE_TOL) or np.allclose(step, np.eye(4), atol=AFFINE_TOL))


def _image(volume: np.ndarray, affine: np.ndarray) -> tuple[sitk.Image, tuple[int, ...]]:
    """An ``(i, j, k)`` volume with its RAS affine as a SimpleITK image without a transposing copy, and
    which volume axes its index axes ``(x, y, z)`` are: ``(i, j, k)``, or ``(k, j, i)`` for C order."""
    axes = (0, 1, 2) if volume.transpose(2, 1, 0).flags.c_contiguous else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(axes[::-1])))
    origin, spacing, direction = geometry_from_affine(affine[:, [*axes, 3]])
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image, axes


def _matching_axes(source: np.ndarray, target: np.ndarray) -> tuple[int, ...]:
    """The target axes most parallel to the source's ``x, y, z`` axes (``source`` and ``target``: 3x3
    with one column per axis): resampling along them reads the input in memory order."""
    cosines = np.abs((source / np.linalg.norm(source, axis=0)).T @ (target / np.linalg.norm(target, axis=0)))
    return max(itertools.permutations(range(3)), key=lambda p: sum(cosines[m, a] for m, a in enumerate(p)))


def resample_border(
    volume: np.ndarray, affine: np.ndarray, target: np.ndarray, size: tuple[int, int, int]
) -> tuple[sitk.Image, np.ndarray]:
    """``volume`` ``(i, j, k)`` (RAS ``affine``) sampled trilinearly at the voxel centres of the
    ``target`` grid of ``size``; outside the input the nearest edge value (MONAI's ``"border"``).
    Returns the resampled image and its float32 array as an ``(i, j, k)`` view (valid while the image
    lives; its axes follow the input's memory order, which keeps ITK's reads cache friendly)."""
    corners = np.ones((4, 8))
    corners[:3] = np.array(list(itertools.product(*[(0.0, n - 1.0) for n in size]))).T
    reach = (np.linalg.solve(affine, target) @ corners)[:3]  # output corners in input voxels
    # ITK interpolates up to half a voxel out, clamping to the edge as "border" does; pad beyond that
    below = np.maximum(0, np.ceil(-reach.min(axis=1) - 0.25)).astype(int)
    above = np.maximum(0, np.ceil(reach.max(axis=1) - (np.asarray(volume.shape) - 1) - 0.25)).astype(int)
    if below.any() or above.any():
        volume = np.pad(volume, list(zip(below.tolist(), above.tolist(), strict=True)), mode="edge")
        affine = affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ below
    source, source_axes = _image(np.asarray(volume, dtype=np.float32), affine)
    axes = _matching_axes(affine[:3, list(source_axes)], target[:3, :3])
    origin, spacing, direction = geometry_from_affine(target[:, [*axes, 3]])
    image = sitk.Resample(
        source, [int(size[a]) for a in axes], sitk.Transform(), sitk.sitkLinear,
        origin, spacing, direction, 0.0, sitk.sitkFloat32,
    )  # fmt: skip
    view = sitk.GetArrayViewFromImage(image)  # axes (z, y, x) = target axes axes[2], axes[1], axes[0]
    return image, view.transpose([2 - axes.index(a) for a in range(3)])


def _crop(volume: np.ndarray, affine: np.ndarray, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The centred crop part of MONAI's ``ResizeWithPadOrCrop`` (a view) and its affine."""
    affine = affine.copy()
    window = []
    for axis, wanted in enumerate(shape):
        current = volume.shape[axis]
        start = current // 2 - wanted // 2 if current > wanted else 0
        window.append(slice(start, start + min(current, wanted)))
        affine[:3, 3] += affine[:3, axis] * start
    return volume[tuple(window)], affine


def preprocess_with_resampling(
    data: np.ndarray, affine: np.ndarray, spec: dict[str, Any], in_channels: int, steps: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(array, RAS affine)`` of ``data`` ``(1, D, H, W)`` in the card's network space, resampled with
    SimpleITK (``steps`` records what was done), or ``None`` when this case needs the MONAI path."""
    if not _applies(spec, affine, in_channels):
        return None
    from engine_tools.volumes import _validated_code

    code = _validated_code(spec["orientation"]) if spec.get("orientation") else None
    source = source_axes(affine) if code else None
    oriented, shape = affine, tuple(data.shape[1:])
    if code:
        order, _, oriented = orientation_plan(affine, shape, code, source)
        shape = tuple(shape[a] for a in order)
        steps["orientation"] = code
    spacing = _triple(spec.get("spacing")) if spec.get("spacing") else None
    image = None  # the resampled image, alive while its array view is used
    if spacing:
        steps["spacing"] = spacing
        target, size = spacing_grid(oriented, shape, spacing)
        if not _unchanged(oriented, target, shape, size):
            image, values = resample_border(data[0], affine, target, size)
            oriented = target
    if image is None:
        values = reorient(data, affine, code, source)[0][0] if code else data[0]
    rule = spec.get("intensity") or {"rule": "none"}
    shape_wanted = [int(s) for s in _triple(spec["shape"]) or []] if spec.get("shape") else None
    region, out_affine = _crop(values, oriented, shape_wanted) if shape_wanted else (values, oriented)
    if rule.get("rule", "none") == "none":
        array, steps["intensity"] = np.array(region, dtype=np.float32, order="C"), {"rule": "none"}
    else:  # quantiles of the whole resampled volume, as the MONAI path, scaling only what is kept
        limits = quantile_range(values, rule) if rule["rule"] == "quantile" else None
        array, steps["intensity"] = scale_range(region, rule, limits)
    array = array[None]
    if shape_wanted:
        steps["shape"] = shape_wanted
        array, out_affine = pad_or_crop(array, out_affine, shape_wanted)  # only pads by now
    return np.ascontiguousarray(array, dtype=np.float32), out_affine
