"""Synthetic scans with known geometry for the volume, calibration and segmentation tests.

A phantom is a SimpleITK image in ITK's LPS world holding a bright ball (or box) at a known world
position, plus its ground-truth mask on the same grid. Directions cover the cases that break
geometry code: LPS (identity), RAS (x and y flipped), oblique (rotated), and permuted axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
#: Axis 0 toward Left, 1 toward Inferior, 2 toward Anterior (FreeSurfer conformed, "LIA").
LIA = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)


def rotation(degrees_xyz: tuple[float, float, float]) -> tuple[float, ...]:
    """A direction matrix (row-major, as SimpleITK wants) rotating about x, then y, then z."""
    ax, ay, az = np.deg2rad(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel().tolist())


OBLIQUE = rotation((20.0, -15.0, 30.0))


@dataclass
class Phantom:
    image: sitk.Image  # float32 (or the requested pixel type) intensities
    mask: sitk.Image  # uint8 ground truth on the same grid
    center: np.ndarray  # LPS mm
    radius: float


def world_points(image: sitk.Image) -> np.ndarray:
    """LPS coordinates of every voxel, shaped like SimpleITK's array ``(k, j, i, 3)``."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(s) for s in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(np.float64)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    matrix = direction @ np.diag(image.GetSpacing())
    return index @ matrix.T + np.asarray(image.GetOrigin())


def make_phantom(
    size: tuple[int, int, int] = (40, 36, 32),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    direction: tuple[float, ...] = LPS,
    origin: tuple[float, float, float] = (-20.0, 15.0, 40.0),
    offset_mm: tuple[float, float, float] = (4.0, -3.0, 2.5),
    radius: float = 7.0,
    inside: float = 1.0,
    outside: float = 0.0,
    shape: str = "ball",
    pixel: int = sitk.sitkFloat32,
) -> Phantom:
    """A ball (or cube of half-width ``radius``) centred ``offset_mm`` (LPS) from the grid centre."""
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    grid_center = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size]))
    center = grid_center + np.asarray(offset_mm)
    points = world_points(image) - center
    if shape == "ball":
        inside_mask = np.linalg.norm(points, axis=-1) <= radius
    elif shape == "box":
        inside_mask = np.all(np.abs(points) <= radius, axis=-1)
    else:
        raise ValueError(shape)
    values = np.where(inside_mask, inside, outside).astype(np.float32)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    if pixel != sitk.sitkFloat32:
        out = sitk.Cast(out, pixel)
    mask = sitk.GetImageFromArray(inside_mask.astype(np.uint8))
    mask.CopyInformation(image)
    return Phantom(out, mask, center, radius)


def dice(a: sitk.Image | np.ndarray, b: sitk.Image | np.ndarray) -> float:
    a = sitk.GetArrayViewFromImage(a) if isinstance(a, sitk.Image) else a
    b = sitk.GetArrayViewFromImage(b) if isinstance(b, sitk.Image) else b
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def world_centroid(mask: sitk.Image) -> np.ndarray:
    """LPS centroid (mm) of the nonzero voxels of ``mask``."""
    selected = sitk.GetArrayViewFromImage(mask) > 0
    if not selected.any():
        raise AssertionError("mask is empty")
    return world_points(mask)[selected].mean(axis=0)
