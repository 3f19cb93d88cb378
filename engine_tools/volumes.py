"""Reading, writing and preprocessing 3-D scans with their geometry intact.

Images are :class:`SimpleITK.Image` objects (what Slicer ships): origin, spacing and direction in
ITK's LPS world. :func:`read_image` (:mod:`engine_tools.scans`) reads NIfTI, NRRD, MHA/MHD, MGZ/MGH
(through nibabel) and DICOM series folders; :func:`write_image` writes atomically and never overwrites
unless asked.

Axis convention of the network space
------------------------------------
:func:`preprocess` returns :class:`Preprocessed` whose ``array`` is ``float32`` ``(C, D, H, W)`` and
``array[c, i, j, k]`` is voxel ``(i, j, k)`` of the reoriented, resampled image, i.e. the nibabel /
MONAI order (the first array axis is the image's first index axis), **not** SimpleITK's numpy order
``(k, j, i)``. ``Preprocessed.affine`` maps ``(i, j, k, 1)`` to RAS millimetres. The card's
``orientation`` is a nibabel-style code naming where each array axis *points*: ``"RAS"`` means
``i`` increases toward Right, ``j`` toward Anterior, ``k`` toward Superior; ``"LIA"`` (FreeSurfer
conformed) means ``i`` → Left, ``j`` → Inferior, ``k`` → Anterior. A network trained on arrays read
in another order is described by permuting the code: a TF.js model fed a flat x-fastest LIA volume
reshaped to ``[z, y, x]`` sees axis 0 → A, axis 1 → I, axis 2 → L, i.e. orientation ``"AIL"``.

Card ``preprocessing`` keys (see :mod:`engine_tools.registry`)::

    "orientation": "RAS" | "LIA" | ... | null      # null keeps the input orientation
    "spacing": [sx, sy, sz] | null                 # mm along the reoriented axes i, j, k
    "crop_foreground": {"threshold": 0, "margin": 10} | null   # crop to voxels > threshold (+ margin)
    "shape": [D, H, W] | null                      # centre pad/crop after resampling ("conform")
    "intensity": {"rule": "quantile", "lower": 0.02, "upper": 0.98, "b_min": 0, "b_max": 1}
               | {"rule": "window", "a_min": -175, "a_max": 250, "b_min": 0, "b_max": 1}
               | {"rule": "zscore", "nonzero": true}
               | {"rule": "none"}

Order: orientation → spacing (linear) → foreground crop → intensity → pad/crop (pad value 0, after
normalisation).
:func:`to_input_geometry` resamples a network-space label array (nearest neighbour) back onto the
exact input grid (size, origin, spacing, direction).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from engine_tools.cache import TMP_PREFIX
from engine_tools.checks import non_finite_message, replace_non_finite, volume_warnings
from engine_tools.conformed import already_conformed, quantile_range, scale_range
from engine_tools.fast_preprocess import preprocess_without_monai
from engine_tools.fast_resample import preprocess_with_resampling
from engine_tools.geometry import (
    _AXIS_LABELS,
    geometry_from_affine,
    ijk_array,
    image_from_ras_array,
    is_orthonormal,
    orientation_code,
    ras_affine,
)
from engine_tools.scans import (
    IMAGE_SUFFIXES,
    NIBABEL_SUFFIXES,
    VolumeError,
    VolumeWarning,
    image_suffix,
    itk_message,
    itk_warnings,
    read_image,
)

#: Reading lives in :mod:`engine_tools.scans`, geometry in :mod:`engine_tools.geometry`; these names
#: stay importable from here.
__all__ = [
    "IMAGE_SUFFIXES",
    "Preprocessed",
    "VolumeError",
    "VolumeWarning",
    "geometry_from_affine",
    "ijk_array",
    "image_from_ras_array",
    "image_suffix",
    "is_orthonormal",
    "itk_warnings",
    "normalize_intensity",
    "orientation_code",
    "preprocess",
    "ras_affine",
    "read_image",
    "to_input_geometry",
    "write_image",
]


# --------------------------------------------------------------------------------------------- writing


def write_image(image: sitk.Image, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` (type from the ending; ``.mgz`` through nibabel) atomically.

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is false. The files are written in
    a temporary folder beside ``path`` and moved into place only when complete.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as labels.nii.gz")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    suffix = image_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        staged = tmp / path.name
        if suffix in NIBABEL_SUFFIXES or (suffix in (".nii", ".nii.gz") and not is_orthonormal(image)):
            import nibabel as nib

            # nibabel keeps a sheared affine exactly (ITK's NIfTI writer would orthonormalise it)
            kind = nib.MGHImage if suffix in NIBABEL_SUFFIXES else nib.Nifti1Image
            array = np.asarray(ijk_array(image))
            nib.save(kind(array, ras_affine(image)), str(staged))
        else:
            try:
                sitk.WriteImage(image, str(staged), useCompression=suffix not in (".nii",))
            except RuntimeError as exc:
                raise VolumeError(f"{path}: cannot write this image type ({itk_message(exc)})") from exc
        # data files (.raw/.zraw of .mhd/.nhdr) first, the header last
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessed:
    """A volume in network space plus what is needed to map results back onto the input grid.

    ``array``: float32 ``(C, D, H, W)``, indexed ``[c, i, j, k]`` (see the module docstring).
    ``affine``: RAS voxel-to-world matrix of the network grid. ``input_*``: the input image's grid in
    SimpleITK terms. ``steps``: what was done (orientations, spacings, pad/crop, intensity range).
    """

    array: np.ndarray
    affine: np.ndarray
    input_size: tuple[int, int, int]
    input_origin: tuple[float, float, float]
    input_spacing: tuple[float, float, float]
    input_direction: tuple[float, ...]
    steps: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]


def _preprocessing_of(card: Any) -> tuple[dict[str, Any], int]:
    if isinstance(card, dict):
        return card.get("preprocessing", card), int(card.get("network", {}).get("in_channels", 1))
    return card.preprocessing, card.in_channels


def preprocess(image: sitk.Image | str | Path, card: Any) -> Preprocessed:
    """Bring ``image`` into the card's network space (orientation, spacing, intensity, shape).

    ``card`` is a :class:`engine_tools.registry.ModelCard` or a dict with a ``preprocessing`` entry.
    Conformed inputs (:mod:`engine_tools.conformed`) and inputs that need no resampling (cards without
    foreground crop or z-score, :mod:`engine_tools.fast_preprocess`) are done in numpy (same result);
    such cards' resampling is done with SimpleITK (:mod:`engine_tools.fast_resample`, same grid, values
    equal to float32 rounding). The rest goes through MONAI.
    """
    source = None
    if not isinstance(image, sitk.Image):
        source = str(image)
        image = read_image(image)
    spec, in_channels = _preprocessing_of(card)
    if in_channels != 1:
        raise VolumeError(
            f"this model needs {in_channels} input channels; only single-channel scans are supported"
        )
    affine = ras_affine(image)
    steps: dict[str, Any] = {
        "input_orientation": orientation_code(image),
        "input_spacing": list(image.GetSpacing()),
    }
    data = np.asarray(ijk_array(image), dtype=np.float32)[None]
    data, non_finite = replace_non_finite(data)
    steps["warnings"] = [non_finite_message(non_finite, data.size)] if non_finite else []
    steps["warnings"] += volume_warnings(image, card) if not isinstance(card, dict) else []
    steps["non_finite_replaced"] = non_finite
    if already_conformed(image, spec):  # nothing to resample: no PyTorch/MONAI import either
        array, steps["intensity"] = scale_range(data, spec["intensity"])
        steps.update(orientation=str(spec["orientation"]).upper(), conformed_input=True)
        array = np.ascontiguousarray(array, dtype=np.float32)
        return Preprocessed(array, affine, *_input_grid(image), steps=steps, source=source)
    fast = preprocess_without_monai(data, affine, spec, in_channels, steps)
    if fast is None:  # resampling too, but no foreground crop or z-score: SimpleITK
        fast = preprocess_with_resampling(data, affine, spec, in_channels, steps)
    if fast is not None:  # no PyTorch/MONAI import
        return Preprocessed(fast[0], fast[1], *_input_grid(image), steps=steps, source=source)
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(data)), affine=torch.from_numpy(affine))

    code = spec.get("orientation")
    if code:
        code = _validated_code(code)
        tensor = Orientation(axcodes=code, labels=_AXIS_LABELS)(tensor)
        steps["orientation"] = code
    spacing = spec.get("spacing")
    if spacing:
        pixdim = [float(s) for s in ([spacing] * 3 if np.isscalar(spacing) else spacing)]
        tensor = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border", dtype=torch.float32)(tensor)
        steps["spacing"] = pixdim
    crop = spec.get("crop_foreground")
    if crop:
        tensor, steps["crop_foreground"] = _crop_foreground(tensor, crop)
    out_affine = np.asarray(tensor.affine, dtype=np.float64)
    array = np.asarray(tensor.as_tensor().numpy(), dtype=np.float32)
    array, steps["intensity"] = normalize_intensity(array, spec.get("intensity") or {"rule": "none"})
    shape = spec.get("shape")
    if shape:
        shape = [int(s) for s in ([shape] * 3 if np.isscalar(shape) else shape)]
        resized = ResizeWithPadOrCrop(spatial_size=shape, mode="constant")(
            MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(out_affine))
        )
        out_affine = np.asarray(resized.affine, dtype=np.float64)
        array = np.asarray(resized.as_tensor().numpy(), dtype=np.float32)
        steps["shape"] = shape
    array = np.ascontiguousarray(array, dtype=np.float32)
    return Preprocessed(array, out_affine, *_input_grid(image), steps=steps, source=source)


def _input_grid(image: sitk.Image) -> tuple[Any, Any, Any, Any]:
    """Size, origin, spacing and direction of the input (where labels go back to)."""
    return (
        tuple(image.GetSize()),
        tuple(image.GetOrigin()),
        tuple(image.GetSpacing()),
        tuple(image.GetDirection()),
    )


def _crop_foreground(tensor: Any, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """MONAI ``CropForeground`` (voxels above ``threshold``, plus ``margin``), as VISTA3D's bundle
    crops before its intensity window; the affine follows, so labels map back to the full input."""
    from monai.transforms import CropForeground

    threshold, margin = float(spec.get("threshold", 0.0)), int(spec.get("margin", 0))
    used: dict[str, Any] = {"threshold": threshold, "margin": margin}
    if not bool((tensor > threshold).any()):
        return tensor, {**used, "skipped": "no voxel above the threshold"}
    cropped = CropForeground(select_fn=lambda x: x > threshold, margin=margin, allow_smaller=True)(tensor)
    return cropped, {**used, "shape": list(cropped.shape[1:])}


def _validated_code(code: str) -> str:
    code = str(code).upper()
    pairs = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    if len(code) != 3 or any(c not in pairs for c in code) or len({pairs[c] for c in code}) != 3:
        raise VolumeError(
            f"orientation {code!r} is not an axis code: three letters, one of L/R, P/A, I/S each (e.g. RAS, LIA)"
        )
    return code


def normalize_intensity(array: np.ndarray, rule: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a card intensity rule to a float32 array; returns the array and the values used.

    An optional ``"then_scale": {"b_min": -1, "b_max": 1}`` min-max scales the result afterwards
    (MONAI ``ScaleIntensity``), e.g. for bundles that z-score and then scale to ``[-1, 1]``.
    """
    from monai.transforms import ScaleIntensity

    array, used = _apply_intensity_rule(array, rule)
    then = rule.get("then_scale")
    if then:
        minv, maxv = float(then.get("b_min", 0.0)), float(then.get("b_max", 1.0))
        array = np.asarray(ScaleIntensity(minv=minv, maxv=maxv)(array), np.float32)
        used["then_scale"] = {"b_min": minv, "b_max": maxv}
    return array, used


def _apply_intensity_rule(array: np.ndarray, rule: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    name = rule.get("rule", "none")
    b_min, b_max = float(rule.get("b_min", 0.0)), float(rule.get("b_max", 1.0))
    clip = bool(rule.get("clip", True))
    if name == "none":
        return array, {"rule": "none"}
    if name == "quantile":
        a_min, a_max = quantile_range(array, rule)
        scaled = ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=clip)(array)
        return np.asarray(scaled, np.float32), {"rule": name, "a_min": a_min, "a_max": a_max}
    if name == "window":
        try:
            a_min, a_max = float(rule["a_min"]), float(rule["a_max"])
        except KeyError as exc:
            raise VolumeError(f"intensity rule 'window' needs a_min and a_max ({exc} missing)") from exc
        scaled = ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=clip)(array)
        return np.asarray(scaled, np.float32), {"rule": name, "a_min": a_min, "a_max": a_max}
    if name == "zscore":
        nonzero = bool(rule.get("nonzero", True))
        normalized = NormalizeIntensity(nonzero=nonzero, channel_wise=True)(array)
        return np.asarray(normalized, np.float32), {"rule": name, "nonzero": nonzero}
    raise VolumeError(f"unknown intensity rule {name!r} (use quantile, window, zscore or none)")


def network_image(array: np.ndarray, prep: Preprocessed) -> sitk.Image:
    """A network-space array ``(D, H, W)`` (or ``(1, D, H, W)``) as an image on the network grid."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.shape != prep.spatial_shape:
        raise ValueError(f"array of shape {array.shape} does not match the network grid {prep.spatial_shape}")
    return image_from_ras_array(array, prep.affine)


def to_input_geometry(label_array: Any, prep: Preprocessed, interpolator: str = "nearest") -> sitk.Image:
    """Resample a network-space label array back onto the exact input grid (nearest neighbour).

    ``label_array`` is ``(D, H, W)`` or ``(1, D, H, W)`` (numpy or torch) on ``prep``'s network grid.
    Voxels of the input outside the network grid get 0. Labels are stored as uint8 (uint16 above 255);
    ``interpolator="linear"`` resamples continuous maps (float32) instead.
    """
    if hasattr(label_array, "detach"):
        label_array = label_array.detach().cpu().numpy()
    label_array = np.asarray(label_array)
    if interpolator == "nearest":
        top = int(label_array.max()) if label_array.size else 0
        pixel = sitk.sitkUInt8 if 0 <= top < 256 and label_array.min() >= 0 else sitk.sitkUInt16
        dtype = np.uint8 if pixel == sitk.sitkUInt8 else np.uint16
        if label_array.min() < 0 or top > 65535:
            raise ValueError("label values must lie in 0..65535")
        source = network_image(label_array.astype(dtype), prep)
        method = sitk.sitkNearestNeighbor
    elif interpolator == "linear":
        source = network_image(label_array.astype(np.float32), prep)
        pixel, method = sitk.sitkFloat32, sitk.sitkLinear
    else:
        raise ValueError(f"interpolator must be 'nearest' or 'linear', not {interpolator!r}")
    return sitk.Resample(
        source,
        [int(s) for s in prep.input_size],
        sitk.Transform(),
        method,
        prep.input_origin,
        prep.input_spacing,
        prep.input_direction,
        0,
        pixel,
    )


def modality_mismatch(image: sitk.Image, modality: str) -> str | None:
    """Why the intensities of ``image`` do not look like ``modality`` ("CT" in HU, or "MR"); else None."""
    values = sitk.GetArrayViewFromImage(image)
    sample = values.ravel()[:: max(1, values.size // 2_000_000)]
    low = float(np.percentile(sample, 0.5))
    modality = (modality or "").upper()
    if modality == "CT" and float(sample.min()) > -500:
        return (
            f"intensities do not look like CT in Hounsfield units (lowest value {float(sample.min()):.0f}, "
            f"no air below -500): is it an MR scan or an already normalised image?"
        )
    if modality in ("MR", "MRI") and low < -500:
        return (
            f"intensities look like CT in Hounsfield units (0.5th percentile {low:.0f}) but the model "
            f"expects MR"
        )
    return None
