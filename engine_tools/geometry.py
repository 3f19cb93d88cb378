"""Image geometry: voxel-to-world matrices in RAS (nibabel, MONAI) and ITK's LPS, orientation codes."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: Flips between RAS (nibabel, MONAI) and LPS (ITK) world coordinates.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping voxel index ``(i, j, k, 1)`` of ``image`` to RAS millimetres."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return affine


def geometry_from_affine(
    affine: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(origin, spacing, direction)`` in ITK's LPS convention for a RAS voxel-to-world ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = _LPS_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = _LPS_RAS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def image_from_ras_array(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image from an ``(i, j, k)``-ordered array and its RAS affine (nibabel style)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    origin, spacing, direction = geometry_from_affine(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def is_orthonormal(image: sitk.Image, tolerance: float = 1e-6) -> bool:
    """Whether the image's direction cosines are orthonormal (ITK's NIfTI writer assumes so)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return bool(np.allclose(direction.T @ direction, np.eye(3), atol=tolerance))


def ijk_array(image: sitk.Image) -> np.ndarray:
    """Voxel values indexed ``[i, j, k]`` (a transposed view of SimpleITK's ``[k, j, i]`` array)."""
    return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)


def orientation_code(image: sitk.Image) -> str:
    """nibabel-style axis code (where each index axis points, e.g. ``"LPS"``) of an image."""
    from engine_tools.fast_preprocess import axis_code

    aligned = axis_code(ras_affine(image))
    if aligned is not None:  # the common case, without importing nibabel
        return aligned
    import nibabel as nib

    return "".join(nib.aff2axcodes(ras_affine(image)))
