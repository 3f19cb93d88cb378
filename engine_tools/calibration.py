"""INT8 calibration windows from a folder of unlabeled scans.

:func:`collect_windows` scans a folder recursively (image files and DICOM series folders), preprocesses
each scan exactly as segmentation will (:func:`engine_tools.volumes.preprocess`), and samples windows of
the card's window size whose voxels are mostly foreground, spread evenly over the scans, seeded and
reproducible. Problems are reported per file and never stop the others: unreadable files, 2-D or 4-D
images and scans with no foreground are skipped with a warning naming the file; intensities that do not
fit the card's modality are warned about (the scan is still used); an empty folder, or one with no
usable scan, is an error.

Foreground: after preprocessing, voxels brighter than half-way between the 1st percentile (air or
background) and the Otsu threshold, so that fat in CT and dark grey matter in MR count as tissue.
A window is accepted when at least ``min_foreground`` (default 0.5) of its voxels are foreground; when
the window is larger than the anatomy so that no window gets there (192^3 windows of a conformed 256^3
head), windows with at least 80% of the best achievable fraction are used; a scan whose best window
holds under 5% foreground is skipped as mostly air.

Reproducibility: each scan's candidate windows are shuffled with a generator seeded by ``seed`` and the
scan's relative path, scan ``i`` (sorted order) contributes the first ``N // n (+1)`` of them, and the
windows are ordered round-robin over scans. The :attr:`CalibrationSet.fingerprint` hashes the files'
relative paths, sizes and SHA-256, the card's preprocessing and window size, and the sampling settings;
it keys the on-disk cache (``cache_dir("calibration")/<fingerprint>/windows.npy``, written atomically).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.cache import atomic_directory, cache_dir, sha256_file, sha256_json
from engine_tools.progress import Progress
from engine_tools.scans import IMAGE_SUFFIXES, Scan, VolumeError, find_scans, read_image
from engine_tools.volumes import preprocess

#: Bump when the sampling changes so cached sets are not reused across versions.
SAMPLER_VERSION = 1
#: A scan whose best window holds less tissue than this is skipped as "mostly air".
MIN_BEST_FOREGROUND = 0.05
#: When no window reaches ``min_foreground``, windows within this factor of the best one are used.
NEAR_BEST = 0.8


class CalibrationError(ValueError):
    """No calibration windows can be made from the folder; the message says why, per file."""


@dataclass
class CalibrationSet:
    """Preprocessed windows for INT8 calibration.

    ``windows``: float32 ``(N, C, D, H, W)``, ordered round-robin over the scans. ``sources[n]`` is the
    relative path (or DICOM folder) window ``n`` came from and ``corners[n]`` its start voxel in network
    space (``(0, 0, 0)`` for whole volumes). ``warnings`` name the files that were skipped or look odd.
    """

    windows: np.ndarray
    sources: list[str]
    corners: list[tuple[int, int, int]]
    foreground: list[float]
    warnings: list[str]
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)
    files_used: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    @classmethod
    def from_windows(cls, windows: np.ndarray, source: str = "windows") -> CalibrationSet:
        """A set of already preprocessed ``N, C, D, H, W`` windows (from memory, not from scans)."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if windows.ndim != 5:
            raise ValueError(f"calibration windows must be N, C, D, H, W; got shape {windows.shape}")
        return cls(
            windows=windows,
            sources=[source] * len(windows),
            corners=[(0, 0, 0)] * len(windows),
            foreground=[float("nan")] * len(windows),
            warnings=[],
            fingerprint=hashlib.sha256(windows.tobytes()).hexdigest(),
        )

    def subset(self, indices: list[int], tag: str) -> CalibrationSet:
        return CalibrationSet(
            windows=np.ascontiguousarray(self.windows[indices]),
            sources=[self.sources[i] for i in indices],
            corners=[self.corners[i] for i in indices],
            foreground=[self.foreground[i] for i in indices],
            warnings=list(self.warnings),
            fingerprint=hashlib.sha256(f"{self.fingerprint}:{tag}".encode()).hexdigest(),
            settings={**self.settings, "subset": tag},
            files_used=sorted({self.sources[i] for i in indices}),
            skipped=list(self.skipped),
            from_cache=self.from_cache,
        )

    def split(self, n_holdout: int) -> tuple[CalibrationSet, CalibrationSet]:
        """``(calibration, holdout)``: the last ``n_holdout`` windows (spread over scans) are held out."""
        n_holdout = int(n_holdout)
        if not 0 < n_holdout < len(self):
            raise ValueError(
                f"cannot hold out {n_holdout} of {len(self)} calibration windows (need 0 < n < {len(self)})"
            )
        keep = list(range(len(self) - n_holdout))
        held = list(range(len(self) - n_holdout, len(self)))
        return self.subset(keep, f"calibration-{n_holdout}"), self.subset(held, f"holdout-{n_holdout}")

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {
            "num_windows": len(self),
            "window_shape": list(self.windows.shape[1:]),
            "fingerprint": self.fingerprint,
            "files_used": self.files_used,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "settings": self.settings,
            "from_cache": self.from_cache,
        }


# -------------------------------------------------------------------------------------------- scanning


# -------------------------------------------------------------------------------------------- sampling


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Tissue voxels of a preprocessed volume (half-way between the 1st percentile and Otsu)."""
    values = array.ravel()[:: max(1, array.size // 1_000_000)]
    low = float(np.percentile(values, 1))
    if float(values.max()) <= low:  # no contrast at all (e.g. only air): nothing to calibrate on
        return np.zeros(array.shape, dtype=bool)
    threshold = max(_otsu(values), low)
    return array > low + 0.5 * (threshold - low)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def _pad_to(array: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    """Centre-pad ``(C, D, H, W)`` with zeros so every spatial axis is at least the window."""
    pads = [(0, 0)]
    for size, win in zip(array.shape[1:], window, strict=True):
        extra = max(win - size, 0)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(array, pads) if any(p != (0, 0) for p in pads) else array


def window_fractions(
    mask: np.ndarray, window: tuple[int, int, int], stride: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground fraction of every window start on a ``stride`` grid (plus the last start per axis).

    Returns ``(corners (M, 3), fractions (M,))`` computed from a summed-volume table.
    """
    table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int64)
    table[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    starts = []
    for size, win, step in zip(mask.shape, window, stride, strict=True):
        axis = list(range(0, size - win + 1, step))
        if axis[-1] != size - win:
            axis.append(size - win)
        starts.append(np.asarray(axis))
    a, b, c = np.meshgrid(*starts, indexing="ij")
    a, b, c = a.ravel(), b.ravel(), c.ravel()
    wa, wb, wc = window
    total = (
        table[a + wa, b + wb, c + wc]
        - table[a, b + wb, c + wc]
        - table[a + wa, b, c + wc]
        - table[a + wa, b + wb, c]
        + table[a, b, c + wc]
        + table[a, b + wb, c]
        + table[a + wa, b, c]
        - table[a, b, c]
    )
    return np.stack([a, b, c], axis=1), total / float(wa * wb * wc)


def _ordered_corners(
    array: np.ndarray, window: tuple[int, int, int], min_foreground: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float]:
    """Qualifying window starts in a seeded random order, their fractions, and the best fraction."""
    mask = foreground_mask(array[0])
    stride = tuple(max(1, w // 16) for w in window)
    corners, fractions = window_fractions(mask, window, stride)  # type: ignore[arg-type]
    best = float(fractions.max()) if fractions.size else 0.0
    if best < MIN_BEST_FOREGROUND:
        return corners[:0], fractions[:0], best
    # a window larger than the anatomy (e.g. 192^3 in a conformed 256^3 head) cannot be mostly tissue:
    # then take the windows holding nearly the most tissue possible
    good = np.flatnonzero(fractions >= min(min_foreground, NEAR_BEST * best))
    order = rng.permutation(good)
    return corners[order], fractions[order], best


def _rank(seed: int, relative: str) -> str:
    return hashlib.sha256(f"{seed}:{relative}".encode()).hexdigest()


def _allocation(num_windows: int, num_scans: int) -> list[int]:
    base, extra = divmod(num_windows, num_scans)
    return [base + (1 if i < extra else 0) for i in range(num_scans)]


# ---------------------------------------------------------------------------------------------- public


def collect_windows(
    folder: str | Path,
    card: Any,
    num_windows: int = 32,
    seed: int = 0,
    progress: Progress | None = None,
    whole_volume: bool = False,
    min_foreground: float = 0.5,
    use_cache: bool = True,
) -> CalibrationSet:
    """Sample ``num_windows`` preprocessed windows (card window size) from the scans under ``folder``.

    ``whole_volume=True`` takes each scan's whole preprocessed volume instead (conformed models; all
    scans must then share one network shape), at most ``num_windows`` of them. Raises
    ``FileNotFoundError`` for a missing folder and :class:`CalibrationError` when nothing is usable.
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be at least 1, got {num_windows}")
    if not 0.0 < min_foreground <= 1.0:
        raise ValueError(f"min_foreground must be in (0, 1], got {min_foreground}")
    folder = Path(folder)
    candidates, unrecognised = find_scans(folder)
    messages: list[str] = []
    if unrecognised:
        shown = ", ".join(unrecognised[:5]) + (
            f" and {len(unrecognised) - 5} more" if len(unrecognised) > 5 else ""
        )
        messages.append(
            f"{folder}: ignored {len(unrecognised)} file(s) that are not recognised scans: {shown}"
        )
    if not candidates:
        raise CalibrationError(
            f"{folder}: no scans found (looked for {', '.join(s for s in IMAGE_SUFFIXES if s != '.dcm')} "
            f"files and DICOM series folders, recursively)"
        )
    window = tuple(int(s) for s in card.window_size)
    settings = {
        "sampler_version": SAMPLER_VERSION,
        "num_windows": int(num_windows),
        "seed": int(seed),
        "whole_volume": bool(whole_volume),
        "min_foreground": float(min_foreground),
        "window": list(window),
        "preprocessing": card.preprocessing,
        "modality": card.modality,
    }
    fingerprint = sha256_json(
        {"settings": settings, "files": [_file_identity(c, folder) for c in candidates]}
    )
    cache_path = cache_dir("calibration") / fingerprint if use_cache else None
    if cache_path is not None and (cache_path / "windows.npy").is_file():
        cached = _load_cached(cache_path, fingerprint)
        if cached is not None:
            if progress is not None:
                progress.update("calibration", 1.0, f"{len(cached)} cached windows")
            return cached

    pools, skipped = _sample_pools(candidates, card, window, settings, progress, messages)
    if not pools:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
        raise CalibrationError(f"{folder}: no usable scan for calibration ({reasons})")
    picked = _pick(folder, pools, skipped, num_windows, whole_volume)
    windows = np.stack([pool["windows"][rank][0] for pool, rank in picked]).astype(np.float32, copy=False)
    result = CalibrationSet(
        windows=np.ascontiguousarray(windows),
        sources=[pool["relative"] for pool, _ in picked],
        corners=[pool["windows"][rank][1] for pool, rank in picked],
        foreground=[pool["windows"][rank][2] for pool, rank in picked],
        warnings=messages,
        fingerprint=fingerprint,
        settings=settings,
        files_used=sorted({pool["relative"] for pool, _ in picked}),
        skipped=skipped,
    )
    if cache_path is not None:
        _store(result, cache_path)
    if progress is not None:
        progress.update("calibration", 1.0, f"{len(result)} windows from {len(pools)} scan(s)")
        for message in messages:
            progress.warning(message)
    return result


def _sample_pools(
    candidates: list[Scan],
    card: Any,
    window: tuple[int, ...],
    settings: dict[str, Any],
    progress: Progress | None,
    messages: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Candidate windows of each usable scan (``pools``) and the scans skipped with their reason."""
    num_windows, seed, whole_volume = settings["num_windows"], settings["seed"], settings["whole_volume"]
    min_foreground = settings["min_foreground"]
    pools: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for index, candidate in enumerate(candidates):
        if progress is not None:
            progress.update("calibration", index / len(candidates), f"reading {candidate.relative}")
        need = math.ceil(num_windows / (len(pools) + 1))
        pool = _sample_scan(candidate, card, window, need, seed, whole_volume, min_foreground, messages)
        if isinstance(pool, str):
            skipped.append({"file": candidate.relative, "reason": pool})
            messages.append(f"{candidate.relative}: skipped: {pool}")
            continue
        pools.append(pool)
        if whole_volume:  # keep the num_windows scans ranked first by a seeded hash of their path
            pools.sort(key=lambda item: _rank(seed, item["relative"]))
            del pools[num_windows:]
        else:  # keep only what the final allocation can use (memory stays near 2 x num_windows windows)
            for pool_item, allowed in zip(pools, _allocation(num_windows, len(pools)), strict=True):
                del pool_item["windows"][allowed:]
    return pools, skipped


def _pick(
    folder: Path,
    pools: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    num_windows: int,
    whole_volume: bool,
) -> list[tuple[dict[str, Any], int]]:
    """``(pool, rank)`` of every window used: round-robin over the scans (or one whole volume each)."""
    if whole_volume:
        pools.sort(key=lambda item: item["relative"])
        shapes = {p["windows"][0][0].shape for p in pools}
        if len(shapes) > 1:
            raise CalibrationError(
                f"{folder}: whole-volume calibration needs one network shape, got {sorted(shapes)}; "
                f"use a card with preprocessing.shape (conformed) or window sampling"
            )
        picked = [(pool, 0) for pool in pools]
    else:
        allocation = _allocation(num_windows, len(pools))
        picked = [
            (pool, rank)
            for rank in range(max(allocation))
            for pool, n in zip(pools, allocation, strict=True)
            if rank < n
        ]
    needed = min(num_windows, 2)  # one to calibrate on and one held out for the accuracy guard
    if len(picked) < needed:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped) or "too few scans"
        raise CalibrationError(
            f"{folder}: only {len(picked)} calibration window(s) from usable scans, {needed} needed "
            f"(skipped: {reasons})"
        )
    return picked


def _sample_scan(
    candidate: Scan,
    card: Any,
    window: tuple[int, int, int],
    need: int,
    seed: int,
    whole_volume: bool,
    min_foreground: float,
    messages: list[str],
) -> dict[str, Any] | str:
    """Windows ``[(array, corner, fraction), ...]`` from one scan in sampling order, or why it is skipped."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = read_image(candidate.path, series_uid=candidate.series_uid)
        messages.extend(f"{candidate.relative}: {w.message}" for w in caught)
    except (VolumeError, OSError) as exc:
        return str(exc)
    try:
        prep = preprocess(image, card)
    except (VolumeError, RuntimeError, ValueError) as exc:
        return f"preprocessing failed ({exc})"
    messages.extend(
        f"{candidate.relative}: {message} (model {card.id} expects {card.modality}); used anyway"
        for message in prep.steps.get("warnings", [])
    )
    del image
    if whole_volume:
        fraction = float(foreground_mask(prep.array[0]).mean())
        return {"relative": candidate.relative, "windows": [(prep.array, (0, 0, 0), fraction)]}
    array = _pad_to(prep.array, window)
    rng = np.random.default_rng([seed, zlib.crc32(candidate.relative.encode())])
    corners, fractions, best = _ordered_corners(array, window, min_foreground, rng)
    if len(corners) == 0:
        return f"no window with tissue (best {best:.1%} foreground); mostly air?"
    if len(corners) < need:  # few distinct positions (small scan): reuse them in order
        repeat = np.resize(np.arange(len(corners)), need)
        corners, fractions = corners[repeat], fractions[repeat]
    items = []
    for corner, fraction in zip(corners[:need], fractions[:need], strict=True):
        a, b, c = (int(v) for v in corner)
        crop = array[:, a : a + window[0], b : b + window[1], c : c + window[2]].copy()
        items.append((crop, (a, b, c), round(float(fraction), 4)))
    return {"relative": candidate.relative, "windows": items}


def _file_identity(candidate: Scan, root: Path) -> dict[str, Any]:
    base = root if root.is_dir() else root.parent
    return {
        "scan": candidate.relative,
        "series": candidate.series_uid,
        "files": [
            [
                p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name,
                p.stat().st_size,
                sha256_file(p),
            ]
            for p in candidate.files
        ],
    }


def _store(result: CalibrationSet, path: Path) -> None:
    meta = {k: v for k, v in result.describe().items() if k != "from_cache"}
    meta.update(sources=result.sources, corners=result.corners, foreground=result.foreground)
    with atomic_directory(path) as tmp:
        np.save(tmp / "windows.npy", result.windows)
        meta["windows_sha256"] = sha256_file(tmp / "windows.npy")
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))


def _load_cached(path: Path, fingerprint: str) -> CalibrationSet | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("windows_sha256") != sha256_file(path / "windows.npy"):
            return None  # changed or truncated since it was stored: sample again
        windows = np.load(path / "windows.npy")
    except (OSError, ValueError, AttributeError):
        return None
    if meta.get("fingerprint") != fingerprint or windows.shape[0] != meta.get("num_windows"):
        return None
    return CalibrationSet(
        windows=windows,
        sources=list(meta["sources"]),
        corners=[tuple(c) for c in meta["corners"]],
        foreground=list(meta["foreground"]),
        warnings=list(meta["warnings"]),
        fingerprint=fingerprint,
        settings=meta["settings"],
        files_used=list(meta["files_used"]),
        skipped=list(meta["skipped"]),
        from_cache=True,
    )


def evenly_spaced_windows(array: np.ndarray, window: tuple[int, int, int], count: int) -> np.ndarray:
    """``count`` windows of ``window`` placed evenly along the diagonal of a preprocessed ``C, D, H, W``
    volume (zero-padded where it is smaller than a window): deterministic windows for tests and benchmarks."""
    padded = np.pad(
        array, [(0, 0)] + [(0, max(0, w - s)) for s, w in zip(array.shape[1:], window, strict=True)]
    )
    windows = []
    for index in range(count):
        start = [
            int((s - w) * (index + 1) / (count + 1)) for s, w in zip(padded.shape[1:], window, strict=True)
        ]
        region = tuple(slice(b, b + w) for b, w in zip(start, window, strict=True))
        windows.append(padded[(slice(None), *region)])
    return np.stack(windows).astype(np.float32)
