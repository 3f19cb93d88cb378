"""INT8 calibration samples from a folder of unlabeled scans, and the hold-out for the accuracy guard.

:func:`collect_windows` scans a folder recursively (image files and DICOM series folders) and
preprocesses each scan exactly as segmentation will (:func:`engine_tools.volumes.preprocess`). Then:

* **windows** (default): windows of the card's window size whose voxels are mostly foreground
  (:mod:`engine_tools.calibration_sampling`), spread evenly over the scans, seeded and reproducible:
  each scan's candidate windows are shuffled with a generator seeded by ``seed`` and the scan's
  relative path, scan ``i`` (sorted order) contributes the first ``N // n (+1)`` of them (fewer when
  it has fewer distinct positions: a window as large as the scan is one sample), and the windows are
  ordered round-robin over scans;
* **whole volumes** (automatic for cards whose ``network.fully_convolutional`` is true, or
  ``whole_volume=True``): one sample per scan, its whole preprocessed volume cropped to the head's box
  plus the receptive-field margin (:func:`engine_tools.whole_volume.plan_crop`), i.e. exactly what
  segmentation runs in its one pass. Crops differ in shape between scans.

Problems are reported per file and never stop the others: unreadable files, 2-D or 4-D images and
scans with no foreground are skipped with a warning naming the file; intensities that do not fit the
card's modality are warned about (the scan is still used); an empty folder, or one with no usable
scan, is an error.

Hold-out (:meth:`CalibrationSet.split_subjects`): the accuracy guard validates on whole scans that
calibration never saw, a quarter of them (at least one), chosen by a seeded hash of their paths. With a
single scan only its own held-out windows remain (:meth:`CalibrationSet.split`), and the build says
that the estimate is optimistic. :func:`check_disjoint` keeps a separate validation folder's scans
apart from the calibration scans by their files' SHA-256.

The :attr:`CalibrationSet.fingerprint` hashes the files' relative paths, sizes and SHA-256, the card's
preprocessing, window size and crop, and the sampling settings; it keys the on-disk cache
(:mod:`engine_tools.calibration_store`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.cache import cache_dir, sha256_json
from engine_tools.calibration_sampling import cut_windows as _cut_windows
from engine_tools.calibration_sampling import foreground_mask
from engine_tools.calibration_sampling import pad_to as _pad_to
from engine_tools.calibration_store import file_identity, load_cached, overlapping_scans, scan_hashes, store
from engine_tools.progress import Progress
from engine_tools.scans import IMAGE_SUFFIXES, Scan, VolumeError, find_scans, read_image
from engine_tools.volumes import preprocess

#: Bump when the sampling changes so cached sets are not reused across versions.
SAMPLER_VERSION = 3


class CalibrationError(ValueError):
    """No calibration windows can be made from the folder; the message says why, per file."""


@dataclass
class CalibrationSet:
    """Preprocessed samples for INT8 calibration and for the accuracy guard's validation.

    ``windows``: the samples, float32: one ``(N, C, D, H, W)`` array when they share a shape (windows),
    else a list of ``(C, D, H, W)`` arrays (whole cropped volumes, one per scan); :attr:`samples` gives
    both as a list. Windows are ordered round-robin over the scans. ``sources[n]`` is the relative path
    (or DICOM folder) sample ``n`` came from and ``corners[n]`` its start voxel in network space.
    ``warnings`` name the files that were skipped or look odd; ``scan_sha256`` maps each scan to the
    SHA-256 of its files (to keep validation scans apart from calibration scans).
    """

    windows: np.ndarray | list[np.ndarray]
    sources: list[str]
    corners: list[tuple[int, int, int]]
    foreground: list[float]
    warnings: list[str]
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)
    files_used: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    scan_sha256: dict[str, list[str]] = field(default_factory=dict)
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.windows)

    @staticmethod
    def pack(samples: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """One ``N, C, D, H, W`` array when the samples share a shape, else the list itself."""
        samples = [np.ascontiguousarray(s, dtype=np.float32) for s in samples]
        if len(samples) == 1:
            return samples[0][None]  # a view: a cached (memory-mapped) sample is not read to be packed
        if len({s.shape for s in samples}) == 1:
            return np.stack(samples)
        return samples

    @property
    def samples(self) -> list[np.ndarray]:
        """Every sample as a ``C, D, H, W`` array."""
        return list(self.windows)

    @property
    def whole_volumes(self) -> bool:
        """True when the samples are whole (cropped) volumes, one per scan, rather than windows."""
        return bool(self.settings.get("whole_volume"))

    @property
    def subjects(self) -> list[str]:
        """The scans the samples come from, in sorted order."""
        return sorted(set(self.sources))

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
            files_used=[source],
        )

    def derived_fingerprint(self, tag: str) -> str:
        """The fingerprint of the set :meth:`subset` makes with ``tag`` (known before it is made)."""
        return hashlib.sha256(f"{self.fingerprint}:{tag}".encode()).hexdigest()

    def subset(self, indices: list[int], tag: str, samples: list[np.ndarray] | None = None) -> CalibrationSet:
        """The samples at ``indices`` (or the given ``samples`` made from them) as a set of their own."""
        if samples is None:
            samples = [self.samples[i] for i in indices]
        used = sorted({self.sources[i] for i in indices})
        return CalibrationSet(
            windows=self.pack(samples),
            sources=[self.sources[i] for i in indices],
            corners=[self.corners[i] for i in indices],
            foreground=[self.foreground[i] for i in indices],
            warnings=list(self.warnings),
            fingerprint=self.derived_fingerprint(tag),
            settings={**self.settings, "subset": tag},
            files_used=used,
            skipped=list(self.skipped),
            scan_sha256={k: v for k, v in self.scan_sha256.items() if k in used},
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

    def split_subjects(self, seed: int = 0) -> tuple[CalibrationSet, CalibrationSet] | None:
        """``(calibration, holdout)`` holding out whole scans, or ``None`` with fewer than 2 scans.

        A quarter of the scans (at least 1) is held out: those ranked first by a SHA-256 of ``seed`` and
        the scan's path, so the choice is reproducible and does not depend on the folder's order.
        Every sample of a held-out scan is used for validation only, never for calibration.
        """
        subjects = self.subjects
        if len(subjects) < 2:
            return None
        count = max(1, len(subjects) // 4)
        held = set(sorted(subjects, key=lambda s: _rank(seed, s))[:count])
        keep = [i for i, s in enumerate(self.sources) if s not in held]
        out = [i for i, s in enumerate(self.sources) if s in held]
        tag = f"subjects-{seed}-{count}"
        return self.subset(keep, f"calibration-{tag}"), self.subset(out, f"holdout-{tag}")

    def to_windows(self, window: tuple[int, int, int], per_sample: int, seed: int = 0) -> CalibrationSet:
        """Windows of ``window`` cut from each whole-volume sample (for engines that run windows only):
        ``per_sample`` of the most tissue-rich positions each, seeded, ordered round-robin over samples."""
        cut: list[list[tuple[np.ndarray, tuple[int, int, int], float]]] = []
        for index, sample in enumerate(self.samples):
            rng = np.random.default_rng([seed, zlib.crc32(self.sources[index].encode())])
            cut.append(
                _cut_windows(
                    _pad_to(sample, window), window, per_sample, self.settings.get("min_foreground", 0.5), rng
                )[0]
            )
        order = [(i, r) for r in range(per_sample) for i in range(len(cut)) if r < len(cut[i])]
        subset = self.subset(
            [i for i, _ in order], f"windows-{list(window)}-{per_sample}", [cut[i][r][0] for i, r in order]
        )
        subset.corners = [cut[i][r][1] for i, r in order]
        subset.foreground = [cut[i][r][2] for i, r in order]
        subset.settings["whole_volume"] = False
        return subset

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays): the scans used (``subjects``) and what the samples are."""
        shapes = [list(s.shape) for s in self.samples]
        return {
            "num_samples": len(self),
            "samples": "whole cropped volumes" if self.whole_volumes else "windows",
            "sample_shapes": shapes if self.whole_volumes else shapes[:1],
            "subjects": self.subjects,
            "fingerprint": self.fingerprint,
            "files_used": self.files_used,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "settings": self.settings,
            "from_cache": self.from_cache,
        }


def check_disjoint(calibration: CalibrationSet, validation: CalibrationSet) -> None:
    """Raise :class:`CalibrationError` naming the scans that validation shares with calibration
    (same file SHA-256): the guard's estimate would not be for unseen subjects."""
    pairs = overlapping_scans(calibration.scan_sha256, validation.scan_sha256)
    if pairs:
        shown = "; ".join(f"validation {v} = calibration {c}" for c, v in pairs)
        raise CalibrationError(
            f"the validation scans must be other subjects than the calibration scans, but {len(pairs)} "
            f"are the same files ({shown}); remove them from one of the two folders"
        )


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
    whole_volume: bool | None = None,
    min_foreground: float = 0.5,
    use_cache: bool = True,
) -> CalibrationSet:
    """Sample up to ``num_windows`` preprocessed windows (card window size, distinct positions) from
    the scans under ``folder``.

    ``whole_volume`` (default: the card's ``network.fully_convolutional``) takes one sample per scan
    instead, its whole preprocessed volume cropped as segmentation's one pass crops it, from at most
    ``num_windows`` scans. Raises ``FileNotFoundError`` for a missing folder and
    :class:`CalibrationError` when nothing is usable.
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be at least 1, got {num_windows}")
    if not 0.0 < min_foreground <= 1.0:
        raise ValueError(f"min_foreground must be in (0, 1], got {min_foreground}")
    if whole_volume is None:
        whole_volume = bool(card.network.get("fully_convolutional"))
    folder = Path(folder)
    candidates, messages = _find(folder)
    settings = {
        "sampler_version": SAMPLER_VERSION,
        "num_windows": int(num_windows),
        "seed": int(seed),
        "whole_volume": bool(whole_volume),
        "min_foreground": float(min_foreground),
        "window": [int(s) for s in card.window_size],
        "preprocessing": card.preprocessing,
        "modality": card.modality,
        "crop": {
            "network": card.network.get("receptive_field"),
            "window": card.window.get("crop_foreground"),
        },
    }
    identities = [file_identity(c, folder) for c in candidates]
    fingerprint = sha256_json({"settings": settings, "files": identities})
    cache_path = cache_dir("calibration") / fingerprint if use_cache else None
    cached = load_cached(cache_path, fingerprint) if cache_path is not None else None
    if cached is not None:
        if progress is not None:
            progress.update("calibration", 1.0, f"{len(cached)} cached samples")
        return cached

    pools, skipped = _sample_pools(candidates, card, settings, progress, messages)
    if not pools:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
        raise CalibrationError(f"{folder}: no usable scan for calibration ({reasons})")
    picked = _pick(folder, pools, skipped, num_windows, whole_volume)
    used = sorted({pool["relative"] for pool, _ in picked})
    result = CalibrationSet(
        windows=CalibrationSet.pack([pool["windows"][rank][0] for pool, rank in picked]),
        sources=[pool["relative"] for pool, _ in picked],
        corners=[pool["windows"][rank][1] for pool, rank in picked],
        foreground=[pool["windows"][rank][2] for pool, rank in picked],
        warnings=messages,
        fingerprint=fingerprint,
        settings=settings,
        files_used=used,
        skipped=skipped,
        scan_sha256={k: v for k, v in scan_hashes(identities).items() if k in used},
    )
    if cache_path is not None:
        store(result, cache_path)
    if progress is not None:
        kind = "whole cropped volumes" if whole_volume else "windows"
        progress.update("calibration", 1.0, f"{len(result)} {kind} from {len(pools)} scan(s)")
        for message in messages:
            progress.warning(message)
    return result


def _find(folder: Path) -> tuple[list[Scan], list[str]]:
    """The scans under ``folder`` and a warning about files that are not scans."""
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
    return candidates, messages


def _sample_pools(
    candidates: list[Scan],
    card: Any,
    settings: dict[str, Any],
    progress: Progress | None,
    messages: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Candidate samples of each usable scan (``pools``) and the scans skipped with their reason."""
    num_windows, seed, whole_volume = settings["num_windows"], settings["seed"], settings["whole_volume"]
    pools: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for index, candidate in enumerate(candidates):
        if progress is not None:
            progress.update("calibration", index / len(candidates), f"reading {candidate.relative}")
        need = math.ceil(num_windows / (len(pools) + 1))
        pool = _sample_scan(candidate, card, need, settings, messages)
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
    """``(pool, rank)`` of every sample used: round-robin over the scans (or one whole volume each)."""
    if whole_volume:
        pools.sort(key=lambda item: item["relative"])
        return [(pool, 0) for pool in pools]
    allocation = _allocation(num_windows, len(pools))
    picked = [
        (pool, rank)
        for rank in range(max(allocation))
        for pool, n in zip(pools, allocation, strict=True)
        if rank < min(n, len(pool["windows"]))  # a small scan has fewer distinct window positions
    ]
    if not picked:  # a single window still calibrates (the guard then validates on it, and says so)
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped) or "too few scans"
        raise CalibrationError(f"{folder}: no calibration window from usable scans (skipped: {reasons})")
    return picked


def _sample_scan(
    candidate: Scan, card: Any, need: int, settings: dict[str, Any], messages: list[str]
) -> dict[str, Any] | str:
    """Samples ``[(array, corner, fraction), ...]`` of one scan in sampling order, or why it is skipped."""
    from engine_tools.whole_volume import plan_crop

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
    if settings["whole_volume"]:
        fraction = float(foreground_mask(prep.array[0]).mean())
        if fraction == 0.0:
            return "no tissue in the volume; mostly air?"
        crop = plan_crop(card, prep.array)
        volume = np.ascontiguousarray(prep.array[(slice(None), *crop.slices)])
        return {"relative": candidate.relative, "windows": [(volume, crop.start, round(fraction, 4))]}
    window = tuple(settings["window"])
    rng = np.random.default_rng([settings["seed"], zlib.crc32(candidate.relative.encode())])
    items, best = _cut_windows(_pad_to(prep.array, window), window, need, settings["min_foreground"], rng)
    if not items:
        return f"no window with tissue (best {best:.1%} foreground); mostly air?"
    return {"relative": candidate.relative, "windows": items}
