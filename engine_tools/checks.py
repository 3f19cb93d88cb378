"""Checks that keep bad inputs from turning into silent wrong answers.

* :func:`inspect_nifti`: a truncated or corrupt ``.nii``/``.nii.gz`` is an error (ITK would
  zero-fill the missing voxels and read it without a word); NaN/Inf voxels are counted (ITK reads
  them as 0), so that the file is read with nibabel instead and they are reported.
* :func:`replace_non_finite`: NaN/Inf voxels are replaced by the lowest finite value and counted.
* :func:`volume_warnings`: a constant volume, a volume smaller than the model's receptive field, or
  intensities implausible for the card's modality are reported (the run continues).
* :func:`check_output_path`: the output is never the input, has a known image ending, and its folder
  is writable, all checked before any work is done.
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

#: Endings :func:`engine_tools.volumes.write_image` can write.
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
#: Smallest context (voxels per axis) assumed when a card does not state its receptive field.
DEFAULT_RECEPTIVE_FIELD = 16


class InputError(ValueError):
    """An input or output path cannot be used; the message names it and says what to do."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def inspect_nifti(path: str | Path) -> int:
    """Check that a ``.nii``/``.nii.gz`` holds all the bytes its header promises and return how many
    voxels are NaN or infinite (ITK reads those as 0 without a word; 0 for other files).

    Raises :class:`InputError` for an unreadable header, a corrupt gzip stream or a truncated file.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz") or not path.is_file():
        return 0
    try:
        offset, dtype, shape = nifti_layout(path)
        expected = math.prod(shape) * int(dtype.itemsize)
    except Exception as exc:  # corrupt headers fail in many ways
        raise InputError(
            f"{path}: cannot read as an image (unreadable NIfTI header: {exc}); re-export or re-download it"
        ) from exc
    opener = gzip.open if suffix == ".nii.gz" else open
    try:
        with opener(path, "rb") as stream:
            actual, non_finite = _scan_voxels(stream, offset, expected, dtype)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(
            f"{path}: cannot read as an image (truncated or corrupt compressed file: {exc}); "
            "re-export or re-download it"
        ) from exc
    if actual < expected:
        raise InputError(
            f"{path}: truncated file: {actual} bytes of image data where the header needs {expected} "
            f"({(expected - actual) / max(expected, 1):.0%} missing); re-export or re-download it"
        )
    return non_finite


#: NIfTI datatype code -> numpy type (nifti1.h)
_NIFTI_TYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 32: "c8", 64: "f8", 128: "V3", 256: "i1", 512: "u2",
    768: "u4", 1024: "i8", 1280: "u8", 1536: "f16", 1792: "c16", 2304: "V4",
}  # fmt: skip


def nifti_layout(path: Path) -> tuple[int, np.dtype, tuple[int, ...]]:
    """``(data offset, voxel dtype, shape)`` from a NIfTI-1 or NIfTI-2 header (either byte order)."""
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as stream:
        header = stream.read(540)
    for order in "<>":
        size = int(np.frombuffer(header[:4], dtype=order + "i4")[0]) if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            dims = np.frombuffer(header[40:56], dtype=order + "i2")
            code = int(np.frombuffer(header[70:72], dtype=order + "i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=order + "f4")[0])
            offset = max(offset, 352)
            break
        if size == 540 and len(header) >= 540:
            code = int(np.frombuffer(header[12:14], dtype=order + "i2")[0])
            dims = np.frombuffer(header[16:80], dtype=order + "i8")
            offset = int(np.frombuffer(header[168:176], dtype=order + "i8")[0])
            break
    else:
        raise ValueError("not a NIfTI-1 or NIfTI-2 header (sizeof_hdr is neither 348 nor 540)")
    if code not in _NIFTI_TYPES or not 1 <= int(dims[0]) <= 7:
        raise ValueError(f"unsupported NIfTI datatype {code} or dimension count {int(dims[0])}")
    return offset, np.dtype(order + _NIFTI_TYPES[code]), tuple(int(d) for d in dims[1 : int(dims[0]) + 1])


def _scan_voxels(stream: Any, offset: int, expected: int, dtype: np.dtype) -> tuple[int, int]:
    """``(voxel bytes present, non-finite voxels)`` read from ``stream`` past the header."""
    stream.read(offset)
    floating = dtype.kind in "fc"
    chunk = (1 << 22) // dtype.itemsize * dtype.itemsize
    total = non_finite = 0
    while block := stream.read(chunk):
        usable = block[: max(0, min(len(block), expected - total)) // dtype.itemsize * dtype.itemsize]
        if floating and usable:
            non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(usable, dtype=dtype))))
        total += len(block)
    return total, non_finite


def replace_non_finite(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``(array with NaN/Inf replaced by the lowest finite value, how many were replaced)``."""
    finite = np.isfinite(array)
    count = int(array.size - np.count_nonzero(finite))
    if count == 0:
        return array, 0
    fill = float(array[finite].min()) if count < array.size else 0.0
    return np.where(finite, array, np.float32(fill)).astype(array.dtype, copy=False), count


def non_finite_message(count: int, total: int) -> str:
    return (
        f"{count} of {total} voxels were NaN or infinite ({count / max(total, 1):.2%}); they were replaced "
        "by the lowest finite intensity (background). Check how the scan was converted."
    )


def volume_warnings(image: Any, card: Any) -> list[str]:
    """What looks wrong about ``image`` (SimpleITK) for ``card``: constant, too small, wrong modality."""
    import SimpleITK as sitk

    from engine_tools.volumes import modality_mismatch

    found: list[str] = []
    values = sitk.GetArrayViewFromImage(image)
    finite = values[np.isfinite(values)] if not np.isfinite(values).all() else values
    if finite.size and float(finite.min()) == float(finite.max()):
        found.append(
            f"the volume is constant (every voxel is {float(finite.min()):g}); there is nothing to segment"
        )
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        found.append(
            "the voxel axes are not orthogonal (sheared direction cosines); the labels are written on "
            "exactly the input's grid"
        )
    small = too_small(image, card)
    if small:
        found.append(small)
    if finite.size and not found:
        mismatch = modality_mismatch(image, card.modality)
        if mismatch:
            found.append(mismatch)
    return found


def too_small(image: Any, card: Any) -> str | None:
    """Why ``image`` is smaller than the model's receptive field (physical extent per axis), else None."""
    network = getattr(card, "network", {}) or {}
    field = int(network.get("receptive_field") or DEFAULT_RECEPTIVE_FIELD)
    spacing = (card.preprocessing or {}).get("spacing") if hasattr(card, "preprocessing") else None
    target = [float(s) for s in ([spacing] * 3 if np.isscalar(spacing) else spacing)] if spacing else None
    size, own = image.GetSize(), image.GetSpacing()
    extents = [n * s for n, s in zip(size, own, strict=True)]
    needed = [field * t for t in target] if target else [field * s for s in own]
    if all(e >= n for e, n in zip(extents, needed, strict=True)):
        return None
    return (
        f"the volume ({'x'.join(str(s) for s in size)} voxels, {'x'.join(f'{e:.0f}' for e in extents)} mm) is "
        f"smaller than the model's receptive field ({field} voxels"
        f"{f' at {target[0]:g} mm' if target else ''}); results near every border will be unreliable"
    )


def check_output_path(output: str | Path, inputs: Iterable[str | Path], overwrite: bool = False) -> Path:
    """Refuse an output that is one of ``inputs`` (path or inode), has an unknown image ending, lies in
    a folder that cannot be written, or exists without ``overwrite``. Called before any work."""
    output = Path(output)
    for given in inputs:
        source = Path(given)
        same = output.resolve() == source.resolve() or (
            output.exists() and source.exists() and os.path.samefile(output, source)
        )
        if same:
            raise InputError(
                f"--output {output} is the input {source}: the scan would be replaced by the labels; "
                "choose another output name"
            )
    if _suffix(output) not in WRITABLE_SUFFIXES:
        raise InputError(
            f"--output {output}: {_suffix(output) or 'no ending'} is not an image format; use one of "
            f"{', '.join(WRITABLE_SUFFIXES)}"
        )
    if output.is_dir():
        raise InputError(f"--output {output} is a folder; give a file name such as labels.nii.gz")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    check_writable_folder(output.parent, "--output")
    return output


def check_writable_folder(folder: str | Path, option: str = "--output-dir") -> Path:
    """The folder (or its nearest existing parent, where it would be created) accepts new files."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".medquant-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"{option} {folder}: cannot write in {existing} ({exc.strerror or exc}); choose a writable folder"
        ) from exc
    return folder
