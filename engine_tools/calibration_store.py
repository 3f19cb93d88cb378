"""On-disk cache of calibration sets and the identity of the scans they come from.

A set is stored under ``cache_dir("calibration")/<fingerprint>/``: one ``sample-NNNN.npy`` per sample
(windows share a shape; whole cropped volumes differ from scan to scan) and ``meta.json`` holding the
description and the SHA-256 of every sample file. The folder is written through
:func:`engine_tools.cache.atomic_directory`; a set whose files changed or went missing since is not
loaded (the caller samples again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine_tools.cache import atomic_directory, sha256_file
from engine_tools.scans import Scan

if TYPE_CHECKING:
    from engine_tools.calibration import CalibrationSet


def file_identity(candidate: Scan, root: Path) -> dict[str, Any]:
    """Relative path, size and SHA-256 of every file of one scan (part of the set's fingerprint)."""
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


def scan_hashes(identities: list[dict[str, Any]]) -> dict[str, list[str]]:
    """``{scan: [SHA-256 of each of its files]}`` from :func:`file_identity` entries."""
    return {entry["scan"]: [sha for _, _, sha in entry["files"]] for entry in identities}


def overlapping_scans(first: dict[str, list[str]], second: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Pairs ``(scan of first, scan of second)`` that share at least one file (by SHA-256)."""
    owner = {sha: scan for scan, hashes in first.items() for sha in hashes}
    pairs = {(owner[sha], scan) for scan, hashes in second.items() for sha in hashes if sha in owner}
    return sorted(pairs)


def store(result: CalibrationSet, path: Path) -> None:
    """Write ``result`` atomically: one ``.npy`` per sample plus ``meta.json`` with their SHA-256."""
    meta = {k: v for k, v in result.describe().items() if k != "from_cache"}
    meta.update(
        sources=result.sources,
        corners=result.corners,
        foreground=result.foreground,
        scan_sha256=result.scan_sha256,
    )
    with atomic_directory(path) as tmp:
        hashes = []
        for index, sample in enumerate(result.samples):
            name = f"sample-{index:04d}.npy"
            np.save(tmp / name, sample)
            hashes.append([name, sha256_file(tmp / name)])
        meta["sample_files"] = hashes
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))


def in_memory(windows: np.ndarray | list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """``windows`` (a set's samples) with memory-mapped or read-only arrays copied into writable memory:
    what a build hands to the engines, which may write into their inputs."""
    if isinstance(windows, np.ndarray):
        return np.array(windows) if isinstance(windows, np.memmap) or not windows.flags.writeable else windows
    return [in_memory(sample) for sample in windows]  # type: ignore[misc]


def load_cached(path: Path, fingerprint: str) -> CalibrationSet | None:
    """The set stored at ``path``, or ``None`` when it is missing, changed or truncated. Its samples
    are read-only memory maps of the verified files (see :func:`in_memory`)."""
    from engine_tools.calibration import CalibrationSet

    try:
        meta = json.loads((path / "meta.json").read_text())
        samples = []
        for name, sha in meta["sample_files"]:
            if sha256_file(path / name) != sha:
                return None  # changed or truncated since it was stored: sample again
            # mapped, not read: finding a cached engine needs the set's fingerprint, not its voxels
            samples.append(np.load(path / name, mmap_mode="r"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if meta.get("fingerprint") != fingerprint or len(samples) != meta.get("num_samples") or not samples:
        return None
    return CalibrationSet(
        windows=CalibrationSet.pack(samples),
        sources=list(meta["sources"]),
        corners=[tuple(c) for c in meta["corners"]],
        foreground=list(meta["foreground"]),
        warnings=list(meta["warnings"]),
        fingerprint=fingerprint,
        settings=meta["settings"],
        files_used=list(meta["files_used"]),
        skipped=list(meta["skipped"]),
        scan_sha256={k: list(v) for k, v in meta.get("scan_sha256", {}).items()},
        from_cache=True,
    )
