"""The batch loop: plan (hash, skip what is done), segment in this process or on Dask, record every row.

:func:`run_batch` is what ``medquant segment MODEL --input FOLDER_OR_LIST --output-dir OUT`` runs once
the engine is loaded. One progress stream covers the batch: ``batch`` events carry scans done / total
and the ETA, each scan's own stages (``read``, ``segment`` windows, ``write``) carry a ``[k/n scan]``
prefix. In this process the scans run one after another and the engine uses every core itself; with a
Dask client (:mod:`engine_tools.cluster`) every scan is a task and rows stream back as they finish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine_tools.batch import BatchScan, EngineRef, hash_scan, reference_path, segment_scan
from engine_tools.cache import remove_stale_partials
from engine_tools.manifest import MANIFEST_CSV, MANIFEST_JSON, VOLUMES_CSV, Manifest
from engine_tools.progress import Progress
from engine_tools.registry import ModelCard
from engine_tools.segment import label_table_paths

#: Lock file of a batch's output folder (held while a batch writes there).
LOCK_FILE = ".medquant-batch.lock"


class _ScanProgress(Progress):
    """Forwards a scan's progress and logs to the batch stream with a ``[k/n scan]`` prefix."""

    def __init__(self, parent: Progress, prefix: str) -> None:
        super().__init__()
        self.parent, self.prefix = parent, prefix
        self.should_cancel = parent.should_cancel

    def update(self, stage: str, fraction: float | None = None, message: str = "") -> None:
        self.parent.update(stage, fraction, f"{self.prefix}{message}")

    def log(self, message: str, level: str = "info") -> None:
        self.parent.log(f"{self.prefix}{message}", level)

    def span(self, start: float, stop: float):  # type: ignore[override]
        return self.parent.span(start, stop)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _check_output_folder(
    output_dir: Path, scans: list[BatchScan], manifest: Manifest, overwrite: bool
) -> None:
    """Refuse to replace files in a folder that is not an earlier batch's output (no manifest there)."""
    if manifest.previous or (output_dir / MANIFEST_JSON).exists() or overwrite:
        return
    for scan in scans:
        for path in (Path(scan.output), *label_table_paths(scan.output)):
            if path.exists():
                raise FileExistsError(
                    f"{path} exists and {output_dir} holds no batch manifest: choose a new or empty "
                    "--output-dir, or an earlier batch's folder, or pass --overwrite"
                )


def sliding_window_settings(card: ModelCard, sliding_windows: bool = False) -> dict[str, Any]:
    """The window settings that change the labels (part of what makes a scan "done"): the card's size,
    overlap and blend, and whether sliding windows are forced where one whole-volume pass would run."""
    settings = {key: card.window.get(key) for key in ("size", "overlap", "blend")}
    return {**settings, "sliding_windows": sliding_windows}


def plan(
    scans: list[BatchScan],
    manifest: Manifest,
    engine_key: str,
    card: ModelCard,
    progress: Progress,
    sliding_windows: bool = False,
) -> list[tuple[BatchScan, dict[str, Any]]]:
    """Hash every input; record ``skipped`` rows for scans done earlier with the same engine, window
    settings and input (and ``failed`` rows for unreadable files); return the scans left to segment."""
    settings = sliding_window_settings(card, sliding_windows)
    todo = []
    for index, scan in enumerate(scans):
        progress.update("hash", None, f"hashing {index + 1}/{len(scans)}: {scan.scan}")
        tick = time.perf_counter()
        row: dict[str, Any] = {
            "scan": scan.scan,
            "input": scan.path,
            "output": scan.output,
            "label_table": str(label_table_paths(scan.output)[0]),
            "engine_key": engine_key,
            "model": card.id,
            "window": settings,
            "error": "",
            "warnings": [],
        }
        try:
            row["input_sha256"] = hash_scan(scan)
        except OSError as exc:
            manifest.record(
                {
                    **row,
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "output": "",
                    "timings": {},
                }
            )
            continue
        row["timings"] = {"hash_s": round(time.perf_counter() - tick, 4)}
        earlier = manifest.already_done(scan.scan, row["input_sha256"], engine_key, settings)
        if earlier is not None:
            manifest.record(
                {**earlier, "status": "skipped", "skip_reason": "done earlier, same engine and input"}
            )
        else:
            todo.append((scan, row))
    return todo


def run_batch(
    engine: Any,
    card: ModelCard,
    ref: EngineRef,
    scans: list[BatchScan],
    output_dir: str | Path,
    progress: Progress,
    *,
    input_root: Path | None = None,
    reference: str | None = None,
    client: Any = None,
    cores_per_worker: int | None = None,
    overwrite: bool = False,
    sliding_windows: bool = False,
) -> dict[str, Any]:
    """Segment ``scans`` into ``output_dir`` and keep its manifest and ``volumes.csv`` up to date.

    ``client``: a ``dask.distributed.Client`` (scans become tasks on its workers), else this process.
    ``reference``: a pattern of reference labelmaps (see :func:`engine_tools.batch.reference_path`).
    ``sliding_windows``: overlapping windows even where one whole-volume pass would run.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with output_folder_lock(output_dir):
        started = time.perf_counter()
        leftovers = remove_stale_partials(output_dir)  # of a killed earlier run (its process is gone)
        if leftovers:
            progress.log(f"removed {len(leftovers)} half-written file(s) of an interrupted earlier run")
        manifest = Manifest.load(output_dir, {**engine.describe(), "key": ref.key, "model": card.id})
        _check_output_folder(output_dir, scans, manifest, overwrite)
        labels = [(label.value, label.name) for label in card.labels if label.value != 0]
        todo = plan(scans, manifest, ref.key, card, progress, sliding_windows)
        manifest.save(labels, with_dice=reference is not None)
        root = input_root or Path(scans[0].path).parent
        references = {s.scan: reference_path(reference, s, root) if reference else None for s in scans}
        progress.log(
            f"{len(scans)} scans: {manifest.counts()['skipped']} already done, {len(todo)} to segment"
            + (f" on {client}" if client is not None else "")
        )
        processed_at = time.perf_counter()
        if client is None:
            rows = _segment_here(engine, card, todo, references, progress)
        else:
            from engine_tools.cluster import segment_on_dask

            rows = segment_on_dask(client, ref, todo, references, cores_per_worker, progress)
        for done, row in enumerate(rows, start=1):
            manifest.record(row)
            manifest.save(labels, with_dice=reference is not None)
            _report(progress, row, done, len(todo), time.perf_counter() - processed_at)
        wall = time.perf_counter() - processed_at
        return {
            **_summary(output_dir, manifest, len(scans), ref.key),
            "timings": {
                "segment_wall_s": round(wall, 3),
                "batch_wall_s": round(time.perf_counter() - started, 3),
                "scans_per_hour": round(len(todo) / wall * 3600, 2) if todo and wall > 0 else None,
            },
            "executor": "dask" if client is not None else "local",
        }


@contextmanager
def output_folder_lock(output_dir: Path) -> Iterator[None]:
    """One batch at a time per output folder (an inter-process ``filelock``)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(output_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise RuntimeError(
            f"{output_dir} is being written by another batch; wait for it to finish or choose another --output-dir"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _summary(output_dir: Path, manifest: Manifest, num_scans: int, engine_key: str) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "manifest": str(output_dir / MANIFEST_JSON),
        "manifest_csv": str(output_dir / MANIFEST_CSV),
        "volumes": str(output_dir / VOLUMES_CSV),
        "scans": num_scans,
        "counts": manifest.counts(),
        "engine_key": engine_key,
        "failed": [
            {"scan": r["scan"], "error": r["error"]}
            for r in manifest.rows.values()
            if r["status"] == "failed"
        ],
    }


def _segment_here(
    engine: Any,
    card: ModelCard,
    todo: list[tuple[BatchScan, dict[str, Any]]],
    references: dict[str, Path | None],
    progress: Progress,
):
    for index, (scan, row) in enumerate(todo):
        with progress.span(index / len(todo), (index + 1) / len(todo)):
            scan_progress = _ScanProgress(progress, f"[{index + 1}/{len(todo)} {scan.scan}] ")
            finished = segment_scan(engine, card, scan, row, scan_progress, references.get(scan.scan))
        yield finished  # outside the scan's span: the batch fraction is the overall one


def _report(progress: Progress, row: dict[str, Any], done: int, total: int, elapsed: float) -> None:
    if row["status"] == "failed":
        progress.warning(f"{row['scan']}: failed ({row['error']})")
    else:
        progress.log(f"{row['scan']}: done in {row['timings'].get('total_s', 0):.1f}s -> {row['output']}")
    eta = elapsed / done * (total - done)
    progress.update("batch", done / total, f"{done}/{total} scans segmented, ETA {format_duration(eta)}")
