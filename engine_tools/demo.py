"""Defaults of ``medquant demo``: a real model and a real scan that are reachable offline, on the CPU.

The demo compares FP32, BF16 and INT8 OpenVINO engines of a real brainchop MeshNet on a real T1 scan.
Weights come from the offline mirror ``../shared/models/brainchop`` (relative to the repository) when it
is present, else from the card's published URLs; calibration uses a *different* subject (the MNI152
template) than the scan that is segmented. ``$MEDQUANT_SHARED`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "brainchop-model11_gw_ae"
DEFAULT_PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_BACKEND = "openvino"
DEFAULT_CALIBRATION_WINDOWS = 4
DEFAULT_REPEATS = 2
#: The segmentation before the timing already warms the engine up.
DEFAULT_WARMUP = 0
SCAN = ("data", "mri", "t1_crop.nii.gz")
CALIBRATION_SCANS = (("data", "mri", "mni152_2009_t1.nii.gz"),)
WEIGHTS_MIRROR = ("models", "brainchop")
SHARED_ENV = "MEDQUANT_SHARED"


class DemoDataMissing(FileNotFoundError):
    """The demo's scan, calibration scans or weights are not where the defaults expect them."""


def shared_root() -> Path:
    """``$MEDQUANT_SHARED``, else ``../shared`` beside the repository checkout."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV]).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DemoDataMissing(
            f"demo {what} not found at {path}: put the shared data there, set ${SHARED_ENV} to its folder, "
            "or pass --input/--calibration explicitly"
        )
    return path


def default_scan() -> Path:
    return _require(shared_root().joinpath(*SCAN), "scan")


def default_weights_dir() -> Path | None:
    """The offline weights mirror when present (``None`` lets the card's URLs be used)."""
    mirror = shared_root().joinpath(*WEIGHTS_MIRROR)
    return mirror if mirror.is_dir() else None


def default_calibration_dir() -> Path:
    """A stable cache folder linking the calibration scans (another subject than the demo scan)."""
    from engine_tools.cache import cache_dir

    folder = cache_dir("demo-calibration")
    wanted = set()
    for parts in CALIBRATION_SCANS:
        source = _require(shared_root().joinpath(*parts), "calibration scan")
        link = folder / source.name
        wanted.add(link.name)
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(source)
        except OSError:  # no symlinks (Windows without developer mode): copy the scan instead
            import shutil

            shutil.copyfile(source, link)
    for stale in folder.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    return folder
