"""Finding and reading scans: image files, DICOM series (one grouping, :func:`dicom_series`, for
folder discovery and reading) and folders of both.

:func:`find_scans` walks a folder (calibration sets, cohorts); :func:`read_image` reads one scan as a
3-D scalar :class:`SimpleITK.Image` with its geometry (NIfTI, NRRD, MHA/MHD, MGZ/MGH through nibabel,
or a DICOM series folder). Preprocessing and writing live in :mod:`engine_tools.volumes`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine_tools.checks import InputError, inspect_nifti
from engine_tools.geometry import image_from_ras_array

#: File name endings read as single-file images (lower case). DICOM is read from folders.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh", ".dcm")
NIBABEL_SUFFIXES = (".mgz", ".mgh")


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
    elif image_suffix(path) in NIBABEL_SUFFIXES:
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
                raise VolumeError(f"{path}: cannot read as an image ({itk_message(exc)})") from exc
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


def itk_message(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "Description:" in line or "ERROR" in line.upper()]
    text = (useful or lines or [type(exc).__name__])[-1]
    return text.replace("Description:", "").strip()[:300]


def dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """The DICOM series directly in ``folder``: series UID → its files in slice order (GDCM's grouping).
    Raises ``RuntimeError`` when GDCM cannot scan the folder."""
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    try:
        files = dicom_series(folder)
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot scan the folder for DICOM ({itk_message(exc)})") from exc
    if not files:
        raise VolumeError(
            f"{folder}: folder holds no DICOM series (pass an image file such as .nii.gz, .nrrd, .mha, "
            f".mgz, or a folder of DICOM slices)"
        )
    series = list(files)
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
        raise VolumeError(f"{folder}: cannot read DICOM series {chosen!r} ({itk_message(exc)})") from exc


def _read_with_nibabel(path: Path, itk_error: BaseException | None = None) -> sitk.Image:
    import nibabel as nib

    try:
        nii = nib.load(str(path))
        data = np.asanyarray(nii.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        why = itk_message(itk_error) if itk_error else str(exc)
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


# ------------------------------------------------------------------------------------------ folders
#: Files that accompany images or are plainly not scans; skipped silently.
SIDECAR_SUFFIXES = (
    ".raw",
    ".zraw",
    ".img.gz",
    ".json",
    ".txt",
    ".csv",
    ".md",
    ".tsv",
    ".bval",
    ".bvec",
    ".xml",
)


@dataclass
class Scan:
    """One scan found in a folder: an image file, or one DICOM series of a folder."""

    relative: str  # shown to users and used in the fingerprint
    path: Path  # file, or folder for DICOM
    files: list[Path]  # files whose content makes up the scan
    series_uid: str | None = None


def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def find_scans(folder: str | Path) -> tuple[list[Scan], list[str]]:
    """Image files and DICOM series under ``folder`` (sorted), plus names of unrecognised files."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root}: folder does not exist")
    if root.is_file():
        return [Scan(root.name, root, [root])], []
    candidates: list[Scan] = []
    unrecognised: list[str] = []
    visited: set[str] = set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:  # a symlink loop or a folder linked twice
            subdirs[:] = []
            continue
        visited.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        here = Path(directory)
        dicom_files: list[Path] = []
        for name in sorted(names):
            path = here / name
            lower = name.lower()
            if name.startswith("."):
                continue
            suffix = image_suffix(path)
            if suffix in IMAGE_SUFFIXES and suffix != ".dcm":
                candidates.append(Scan(path.relative_to(root).as_posix(), path, with_data_file(path)))
            elif is_dicom_file(path):
                dicom_files.append(path)
            elif not lower.endswith(SIDECAR_SUFFIXES):
                unrecognised.append(path.relative_to(root).as_posix())
        if dicom_files:
            candidates.extend(_folder_series(here, root, dicom_files))
    return sorted(candidates, key=lambda c: (c.relative, c.series_uid or "")), unrecognised


def with_data_file(path: Path) -> list[Path]:
    """An .mhd/.nhdr header plus the data file it names (so content changes change the fingerprint)."""
    files = [path]
    if image_suffix(path) in (".mhd", ".nhdr"):
        try:
            for line in path.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=" if path.suffix.lower() == ".mhd" else ":")
                if key.strip().lower() in ("elementdatafile", "data file", "datafile"):
                    data = path.parent / value.strip()
                    if data.is_file():
                        files.append(data)
        except OSError:
            pass
    return files


def _folder_series(folder: Path, root: Path, files: list[Path]) -> list[Scan]:
    relative = folder.relative_to(root).as_posix() if folder != root else "."
    try:
        series = dicom_series(folder)
    except RuntimeError:
        series = {}
    if not series:  # let read_image explain the failure
        return [Scan(relative + "/", folder, files)]
    out = []
    for uid, names in series.items():
        label = relative + "/" if len(series) == 1 else f"{relative}/ (series {uid or '<no UID>'})"
        out.append(Scan(label, folder, sorted(Path(n) for n in names), uid))
    return out
