"""Segment a cohort with one engine: find the scans, skip what is done, segment the rest, record it all.

:func:`collect_scans` turns a folder (searched recursively with the calibration scan finder: image files
and DICOM series; BIDS-like trees work as they are), or a ``.txt``/``.csv`` list of paths, into
:class:`BatchScan` entries whose outputs mirror their relative paths under the output folder
(``sub-01/anat/sub-01_T1w.nii.gz`` → ``OUT/sub-01/anat/sub-01_T1w.nii.gz``). :func:`segment_scan`
segments one scan with a loaded engine and returns its manifest row; a scan that fails (unreadable,
corrupt, wrong dimensionality) becomes a ``failed`` row and never stops the batch. The batch loop
itself is in :mod:`engine_tools.batch_run`; Dask workers use :func:`load_engine` with an
:class:`EngineRef` (the cache key and artifact folder of the engine the client built).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_tools.cache import sha256_file
from engine_tools.engines import METADATA_FILE
from engine_tools.progress import Cancelled, Progress
from engine_tools.registry import ModelCard
from engine_tools.scans import find_scans
from engine_tools.volumes import image_suffix

LIST_SUFFIXES = (".txt", ".csv")
OUTPUT_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class BatchScan:
    """One scan of a batch: ``scan`` is its id (relative path), ``path`` a file or DICOM folder,
    ``files`` what its content is made of, ``output`` the labelmap it gets under the output folder."""

    scan: str
    path: str
    files: tuple[str, ...]
    output: str
    series_uid: str | None = None


@dataclass(frozen=True)
class EngineRef:
    """What a worker needs to load the engine the client built: the cache key and artifact folder
    (on storage the workers share), the backend and precision, and the card."""

    key: str
    artifact_dir: str
    backend: str
    precision: str
    device: str
    card: dict[str, Any]
    card_path: str | None = None
    weights_dir: str | None = None
    random_weights: bool = False


# ------------------------------------------------------------------------------------------ inputs


def _output_name(relative: str, series_uid: str | None, root: Path) -> str:
    """``a/b/scan.nrrd`` → ``a/b/scan.nii.gz``; a DICOM folder ``a/dicom/`` → ``a/dicom.nii.gz``."""
    name = relative.split(" (series", 1)[0].rstrip("/")
    if name in ("", "."):
        name = root.name or "scan"
    suffix = image_suffix(name)
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    if series_uid and "(series" in relative:
        name += "_" + re.sub(r"[^A-Za-z0-9.]+", "_", series_uid)
    return name + OUTPUT_SUFFIX


def _scans_under(folder: Path, root: Path, output_dir: Path) -> tuple[list[BatchScan], list[str]]:
    candidates, unrecognised = find_scans(folder)
    out_root = output_dir.resolve()
    scans, notes = [], [f"{folder / name}: not a recognised scan; ignored" for name in unrecognised]
    for candidate in candidates:
        path = Path(candidate.path)
        if path.resolve().is_relative_to(out_root):  # earlier outputs are never inputs
            if folder.is_file():
                notes.append(f"{path}: inside --output-dir {output_dir}; not segmented")
            continue
        relative = candidate.relative
        if folder != root:
            prefix = folder.relative_to(root).as_posix()
            relative = relative if prefix == "." else f"{prefix}/{relative}".replace("/./", "/")
        scans.append(
            BatchScan(
                scan=relative,
                path=str(path),
                files=tuple(str(f) for f in candidate.files),
                output=str(output_dir / _output_name(relative, candidate.series_uid, root)),
                series_uid=candidate.series_uid,
            )
        )
    return scans, notes


def read_list(path: Path) -> list[Path]:
    """Paths in a ``.txt`` (one per line, ``#`` comments) or ``.csv`` (column ``path``/``input``, else
    the first column) list; relative paths are relative to the list's folder."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        column = next((header.index(k) for k in ("path", "input", "scan") if k in header), None)
        entries = [row[column or 0].strip() for row in (rows[1:] if column is not None else rows)]
    else:
        entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise ValueError(f"{path}: the list names no scans (one path per line, or a 'path' column)")
    return [(path.parent / e).resolve() if not Path(e).is_absolute() else Path(e) for e in entries]


def collect_scans(source: str | Path, output_dir: str | Path) -> tuple[list[BatchScan], list[str]]:
    """The scans of a folder or list file, and warnings about what was ignored or is missing.

    Raises ``FileNotFoundError`` when ``source`` does not exist and ``ValueError`` when it holds no scan.
    """
    source, output_dir = Path(source), Path(output_dir)
    if not source.exists():
        raise FileNotFoundError(f"--input {source}: no such folder or list file")
    warnings_found: list[str] = []
    if source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        entries = read_list(source)
        existing = [p for p in entries if p.exists()]
        warnings_found += [
            f"{p}: listed in {source.name} but missing; not segmented" for p in entries if not p.exists()
        ]
        if not existing:
            raise ValueError(f"{source}: none of the {len(entries)} listed paths exists")
        root = Path(os.path.commonpath([p.parent if p.is_file() else p for p in existing]))
        scans: list[BatchScan] = []
        for entry in existing:
            found, ignored = _scans_under(entry, root, output_dir)
            if entry.is_file() and found:  # a listed file keeps its path relative to the common folder
                found = [_relative_to(found[0], entry, root, output_dir)]
            scans += found
            warnings_found += ignored
    elif source.is_dir():
        scans, warnings_found = _scans_under(source, source, output_dir)
    else:
        raise ValueError(f"--input {source}: give a folder of scans or a .txt/.csv list of paths")
    scans = list({scan.scan: scan for scan in scans}.values())  # a scan listed twice is done once
    if not scans:
        raise ValueError(f"--input {source}: no scans found (NIfTI, NRRD, MHA, MGZ files or DICOM folders)")
    return scans, warnings_found


def _relative_to(scan: BatchScan, entry: Path, root: Path, output_dir: Path) -> BatchScan:
    relative = entry.relative_to(root).as_posix()
    return BatchScan(
        relative, scan.path, scan.files, str(output_dir / _output_name(relative, None, root)), scan.series_uid
    )


def hash_scan(scan: BatchScan) -> str:
    """SHA-256 of the scan's file (``sha256sum`` compatible); for several files, of their names and
    SHA-256 in order."""
    if len(scan.files) == 1:
        return sha256_file(scan.files[0])
    digest = hashlib.sha256()
    for name in scan.files:
        digest.update(f"{Path(name).name}:{sha256_file(name)}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ engine


def engine_ref(
    engine: Any, card: ModelCard, weights_dir: str | None = None, random_weights: bool = False
) -> EngineRef:
    """An :class:`EngineRef` for a loaded engine made by :func:`engine_tools.pipeline.prepare_engine`."""
    import json

    if engine.artifact_dir is None:
        raise ValueError("the engine has no artifact folder; build it with prepare_engine")
    metadata = json.loads((Path(engine.artifact_dir) / METADATA_FILE).read_text())
    return EngineRef(
        key=metadata["key"],
        artifact_dir=str(Path(engine.artifact_dir).resolve()),
        backend=engine.backend,
        precision=engine.precision,
        device=engine.device,
        card=card.raw,
        card_path=str(card.path) if card.path else None,
        weights_dir=str(weights_dir) if weights_dir else None,
        random_weights=random_weights,
    )


def load_engine(ref: EngineRef) -> tuple[Any, ModelCard]:
    """Load the engine of ``ref`` from its artifact folder (no export, calibration or build)."""
    import json

    from engine_tools import networks
    from engine_tools.engines import engine_class

    folder = Path(ref.artifact_dir)
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        raise FileNotFoundError(
            f"engine {ref.key[:12]} not found at {folder}: the workers must see the client's cache "
            "(put --cache-dir on storage shared by the client and every worker)"
        )
    metadata = json.loads(metadata_path.read_text())
    if metadata.get("key") != ref.key:
        raise ValueError(f"{folder} holds engine {str(metadata.get('key'))[:12]}, not {ref.key[:12]}")
    card = ModelCard.from_dict(ref.card, Path(ref.card_path) if ref.card_path else None)
    engine = engine_class(ref.backend)(precision=ref.precision, device=ref.device)
    engine.build_report = metadata.get("build_report", {})
    if ref.backend.startswith("torch"):
        engine.attach_factory(
            networks.torch_factory(card, ref.weights_dir, random_weights=ref.random_weights)
        )
    engine.load(folder)
    engine.cache_status = "hit"
    return engine, card


# ------------------------------------------------------------------------------------------ one scan


def reference_path(pattern: str, scan: BatchScan, input_root: Path) -> Path:
    """The reference labelmap of ``scan``: ``pattern`` with ``{stem}`` (file name without its ending),
    ``{scan}`` (relative path without ending) and ``{parent}`` (relative folder) filled in; relative
    patterns are relative to the input folder."""
    relative = scan.scan.split(" (series", 1)[0].rstrip("/")
    suffix = image_suffix(relative)
    no_suffix = relative[: -len(suffix)] if suffix and relative.lower().endswith(suffix) else relative
    parent = Path(no_suffix).parent.as_posix()
    filled = pattern.format(stem=Path(no_suffix).name, scan=no_suffix, parent="" if parent == "." else parent)
    path = Path(filled)
    return path if path.is_absolute() else input_root / path


def segment_scan(
    engine: Any,
    card: ModelCard,
    scan: BatchScan,
    base_row: dict[str, Any],
    progress: Progress,
    reference: Path | None = None,
    worker: str | None = None,
) -> dict[str, Any]:
    """Segment ``scan``, write its labelmap and label tables, and return its manifest row.

    Any failure (other than cancellation) gives a ``failed`` row naming the error; nothing partial is
    left because every file is written atomically.
    """
    row = {**base_row, "worker": worker or f"{socket.gethostname()}:{os.getpid()}"}
    row["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.perf_counter()
    timings = dict(row.get("timings", {}))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sliding = bool(row.get("window", {}).get("sliding_windows"))
            row.update(_segment_and_write(engine, card, scan, progress, reference, timings, sliding))
        row["warnings"] = list(dict.fromkeys(row.get("warnings", []) + [str(w.message) for w in caught]))
        row["status"] = "done"
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bad scan is recorded, the batch goes on
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", output="", label_table="")
    timings["total_s"] = round(time.perf_counter() - started + timings.get("hash_s", 0.0), 4)
    row["timings"] = timings
    return row


def _segment_and_write(
    engine: Any,
    card: ModelCard,
    scan: BatchScan,
    progress: Progress,
    reference: Path | None,
    timings: dict[str, Any],
    sliding_windows: bool = False,
) -> dict[str, Any]:
    from engine_tools.label_stats import dice_per_label, label_volumes, reference_on_grid
    from engine_tools.segment import segment_image, write_segmentation
    from engine_tools.volumes import read_image

    tick = time.perf_counter()
    progress.update("read", 0.0, "reading")
    if Path(scan.output).resolve() in {Path(f).resolve() for f in scan.files}:
        raise ValueError(f"{scan.output} is the input itself; choose another --output-dir")
    image = read_image(scan.path, series_uid=scan.series_uid)
    timings["read_s"] = round(time.perf_counter() - tick, 4)
    result = segment_image(
        engine, card, image, progress=progress, whole_volume=False if sliding_windows else None
    )
    for key in ("preprocess_s", "inference_s", "resample_s", "num_windows", "mode"):
        if key in result.timings:
            timings[key] = result.timings[key]
    tick = time.perf_counter()
    progress.update("write", 1.0, "writing the labelmap and label tables")
    written = write_segmentation(result, scan.output, overwrite=True)
    volumes = label_volumes(result.labels, label_table=result.label_table)
    extra: dict[str, Any] = {"warnings": list(result.warnings)}
    if reference is not None:
        if reference.exists():
            ref_image, note = reference_on_grid(read_image(reference), result.labels)
            if note:
                extra["warnings"].append(f"{reference}: {note}")
            scores = dice_per_label(
                _array(result.labels), _array(ref_image), [e["value"] for e in volumes if e["value"] != 0]
            )
            extra["dice"] = {str(k): v for k, v in scores.items()}
            extra["reference"] = str(reference)
        else:
            extra["warnings"].append(f"reference {reference} not found; no Dice for this scan")
    timings["write_s"] = round(time.perf_counter() - tick, 4)
    spacing = result.labels.GetSpacing()
    return {
        "output": str(written["labels"]),
        "label_table": str(written["label_table_json"]),
        "volumes": volumes,
        "voxel_volume_ml": spacing[0] * spacing[1] * spacing[2] / 1000.0,
        **extra,
    }


def _array(image: Any) -> Any:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)
