"""Defaults of ``medquant demo``: a real model and a real scan, on the CPU, from a plain checkout.

The demo compares FP32, BF16 and INT8 OpenVINO engines of a real brainchop MeshNet on a real T1 scan;
calibration uses a *different* subject (the MNI152 template) than the scan that is segmented. The two
scans are published files pinned in the data card ``Resources/DataCards/demo.json`` and fetched like
model weights (:mod:`engine_tools.weights`): the offline mirror ``../shared/data/mri`` (relative to
the repository; ``$MEDQUANT_SHARED`` points elsewhere) and ``--weights-dir`` first, then the cache,
then a verified download. Weights come from ``../shared/models/brainchop`` when present, else the
same way from the model card's URLs.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine_tools.progress import Progress

DEFAULT_MODEL = "brainchop-model11_gw_ae"
DEFAULT_PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_BACKEND = "openvino"
DEFAULT_CALIBRATION_WINDOWS = 4
DEFAULT_REPEATS = 2
#: The segmentation before the timing already warms the engine up.
DEFAULT_WARMUP = 0
DATA_CARD = "demo"
DATA_MIRROR = ("data", "mri")
WEIGHTS_MIRROR = ("models", "brainchop")
SHARED_ENV = "MEDQUANT_SHARED"


class DemoDataMissing(FileNotFoundError):
    """The demo's scans are neither local nor downloadable; the message says how to provide them."""


def shared_root() -> Path:
    """``$MEDQUANT_SHARED``, else ``../shared`` beside the repository checkout."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV]).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared"


def default_weights_dir() -> Path | None:
    """The offline weights mirror when present (``None`` lets the card's URLs be used)."""
    mirror = shared_root().joinpath(*WEIGHTS_MIRROR)
    return mirror if mirror.is_dir() else None


def demo_files(
    roles: set[str], weights_dir: str | Path | None = None, progress: Progress | None = None
) -> dict[str, list[Path]]:
    """Verified local paths of the data card's files with the given roles (``scan``, ``calibration``),
    by role; downloads what neither the shared mirror, ``weights_dir`` nor the cache holds."""
    from engine_tools.registry import get_data_card
    from engine_tools.weights import WeightsUnavailable, ensure_weights, mirror_dirs

    card = get_data_card(DATA_CARD).with_roles(roles)
    mirror = shared_root().joinpath(*DATA_MIRROR)
    try:
        paths = ensure_weights(card, [mirror, *mirror_dirs(weights_dir)], progress=progress)
    except WeightsUnavailable as exc:
        raise DemoDataMissing(
            f"{exc} The demo also reads its scans from {mirror} (set ${SHARED_ENV} to the folder "
            "holding data/mri), or pass --input/--calibration explicitly."
        ) from exc
    by_role: dict[str, list[Path]] = {role: [] for role in roles}
    for entry in card.files:
        by_role[entry["role"]].append(paths[entry["name"]])
    return by_role


def calibration_folder(scans: list[Path]) -> Path:
    """A stable cache folder linking ``scans`` (and nothing else), for ``--calibration``."""
    from engine_tools.cache import cache_dir

    folder = cache_dir("demo-calibration")
    wanted = set()
    for source in scans:
        link = folder / source.name
        wanted.add(link.name)
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(source.resolve())
        except OSError:  # no symlinks (Windows without developer mode): copy the scan instead
            import shutil

            shutil.copyfile(source, link)
    for stale in folder.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    return folder
