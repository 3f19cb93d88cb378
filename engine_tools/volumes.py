"""Reading, writing and preprocessing 3-D scans with their geometry intact.

Images are :class:`SimpleITK.Image` objects (what Slicer ships): origin, spacing and direction in
ITK's LPS world. :func:`read_image` reads NIfTI, NRRD, MHA/MHD, MGZ/MGH (through nibabel) and DICOM
series folders; :func:`write_image` writes atomically and never overwrites unless asked.

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
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from engine_tools.cache import TMP_PREFIX
from engine_tools.checks import (
    InputError,
    inspect_nifti,
    non_finite_message,
    replace_non_finite,
    volume_warnings,
)

#: File name endings read as single-file images (lower case). DICOM is read from folders.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh", ".dcm")
_NIBABEL_SUFFIXES = (".mgz", ".mgh")
#: Flips between RAS (nibabel, MONAI) and LPS (ITK) world coordinates.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class VolumeError(ValueError):
    """An image cannot be used; the message names the file and says what to do."""


class VolumeWarning(UserWarning):
    """Something about an image is suspicious but it can still be used (e.g. several DICOM series)."""


def image_suffix(path: str | Path) -> str:
    """The file type ending of ``path`` in lower case (``".nii.gz"``, ``".nrrd"``, ...; ``""`` if none)."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


# --------------------------------------------------------------------------------------------- reading


def read_image(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read a 3-D scalar image (NIfTI, NRRD, MHA/MHD, MGZ/MGH, or a DICOM series folder).

    For a folder holding several DICOM series the one with the most slices is read and a
    :class:`VolumeWarning` names the others (``series_uid`` picks one explicitly). A 4-D image with a
    single volume is squeezed to 3-D. Raises ``FileNotFoundError`` or :class:`VolumeError`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        with itk_warnings(path):
            image = _read_dicom_folder(path, series_uid)
    elif image_suffix(path) in _NIBABEL_SUFFIXES:
        image = _read_with_nibabel(path)
    else:
        try:
            non_finite = inspect_nifti(path)
        except InputError as exc:
            raise VolumeError(str(exc)) from exc
        try:
            if non_finite:  # ITK would read NaN/Inf as 0: keep them, preprocess replaces and counts them
                raise RuntimeError(f"{non_finite} non-finite voxels")
            with itk_warnings(path):
                image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            if image_suffix(path) in (".nii", ".nii.gz"):
                image = _read_with_nibabel(path, itk_error=exc)
            else:
                raise VolumeError(f"{path}: cannot read as an image ({_itk_message(exc)})") from exc
    return _checked_3d_scalar(image, path)


@contextmanager
def itk_warnings(source: str | Path) -> Iterator[None]:
    """Turn what ITK prints on stderr during the block (e.g. "Non uniform sampling or missing slices
    detected") into :class:`VolumeWarning` warnings, so that they reach the event stream."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr descriptor
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
    for block in text.split("WARNING:")[1:]:
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        detail = lines[-1] if len(lines) > 1 else (lines[0] if lines else "")
        detail = detail.split("): ", 1)[-1]
        warnings.warn(f"{source}: ITK warning: {detail}", VolumeWarning, stacklevel=3)
    others = text.split("WARNING:")[0].strip()
    if others:
        sys.stderr.write(others + "\n")


def _itk_message(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "Description:" in line or "ERROR" in line.upper()]
    text = (useful or lines or [type(exc).__name__])[-1]
    return text.replace("Description:", "").strip()[:300]


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    try:
        series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot scan the folder for DICOM ({_itk_message(exc)})") from exc
    if not series:
        raise VolumeError(
            f"{folder}: folder holds no DICOM series (pass an image file such as .nii.gz, .nrrd, .mha, "
            f".mgz, or a folder of DICOM slices)"
        )
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    if series_uid is not None:
        if series_uid not in files:
            raise VolumeError(f"{folder}: no DICOM series {series_uid!r}; found {', '.join(series)}")
        chosen = series_uid
    else:
        chosen = max(series, key=lambda uid: len(files[uid]))
        if len(series) > 1:
            others = ", ".join(
                f"{uid or '<no UID>'} ({len(files[uid])} files)" for uid in series if uid != chosen
            )
            warnings.warn(
                f"{folder}: {len(series)} DICOM series; reading {chosen or '<no UID>'} "
                f"({len(files[chosen])} files), ignoring {others}",
                VolumeWarning,
                stacklevel=3,
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot read DICOM series {chosen!r} ({_itk_message(exc)})") from exc


def _read_with_nibabel(path: Path, itk_error: BaseException | None = None) -> sitk.Image:
    import nibabel as nib

    try:
        nii = nib.load(str(path))
        data = np.asanyarray(nii.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        why = _itk_message(itk_error) if itk_error else str(exc)
        raise VolumeError(f"{path}: cannot read as an image ({why})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3] == 1 and data.shape[4] > 1:
        raise VolumeError(
            f"{path}: non-scalar image ({data.shape[4]} components per voxel); convert it to one channel"
        )
    _check_size(tuple(int(s) for s in data.shape), path)
    data = np.asarray(data)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    return image_from_ras_array(data.astype(data.dtype.newbyteorder("="), copy=False), nii.affine)


def _check_size(size: tuple[int, ...], path: Path) -> None:
    """Reject 2-D, multi-volume 4-D and higher-dimensional sizes with an actionable message."""
    dim = len(size)
    if dim == 4 and size[3] != 1:
        raise VolumeError(
            f"{path}: 4-D image with {size[3]} volumes (size {size}); pick one volume first, e.g. "
            f"`fslroi in.nii.gz vol0.nii.gz 0 1` or SimpleITK `image[:, :, :, 0]`"
        )
    if dim == 2 or (dim == 3 and min(size) < 2):
        raise VolumeError(
            f"{path}: 2-D image (size {size}); the models need a 3-D volume (for DICOM pass the folder "
            f"holding the whole series)"
        )
    if dim not in (3, 4):
        raise VolumeError(f"{path}: {dim}-D image (size {size}); a 3-D volume is needed")


def _checked_3d_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    """Squeeze single-volume 4-D images; reject 2-D, multi-volume 4-D and non-scalar images."""
    size = image.GetSize()
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeError(
            f"{path}: non-scalar image ({image.GetNumberOfComponentsPerPixel()} components per voxel, "
            f"{image.GetPixelIDTypeAsString()}); convert it to a single grey-level channel first"
        )
    if "complex" in image.GetPixelIDTypeAsString():
        raise VolumeError(f"{path}: complex-valued image; use its magnitude")
    _check_size(size, path)
    if dim == 4:
        image = image[:, :, :, 0]
        _check_size(image.GetSize(), path)
    return image


# ------------------------------------------------------------------------------------ geometry helpers


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
    import nibabel as nib

    return "".join(nib.aff2axcodes(ras_affine(image)))


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
        if suffix in _NIBABEL_SUFFIXES or (suffix in (".nii", ".nii.gz") and not is_orthonormal(image)):
            import nibabel as nib

            # nibabel keeps a sheared affine exactly (ITK's NIfTI writer would orthonormalise it)
            kind = nib.MGHImage if suffix in _NIBABEL_SUFFIXES else nib.Nifti1Image
            array = np.asarray(ijk_array(image))
            nib.save(kind(array, ras_affine(image)), str(staged))
        else:
            try:
                sitk.WriteImage(image, str(staged), useCompression=suffix not in (".nii",))
            except RuntimeError as exc:
                raise VolumeError(f"{path}: cannot write this image type ({_itk_message(exc)})") from exc
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
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

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
    return Preprocessed(
        array=np.ascontiguousarray(array, dtype=np.float32),
        affine=out_affine,
        input_size=tuple(image.GetSize()),  # type: ignore[arg-type]
        input_origin=tuple(image.GetOrigin()),  # type: ignore[arg-type]
        input_spacing=tuple(image.GetSpacing()),  # type: ignore[arg-type]
        input_direction=tuple(image.GetDirection()),
        steps=steps,
        source=source,
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
        lower, upper = float(rule.get("lower", 0.02)), float(rule.get("upper", 0.98))
        if lower > 1 or upper > 1:  # given as percentiles
            lower, upper = lower / 100, upper / 100
        a_min, a_max = (float(v) for v in np.quantile(array, [lower, upper]))
        if a_max <= a_min:
            a_max = a_min + 1.0
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
