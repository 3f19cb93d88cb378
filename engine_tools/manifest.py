"""The batch manifest (``manifest.json`` + ``manifest.csv``) and the wide ``volumes.csv`` of a batch.

One row per scan: the input path and SHA-256, the output path, the engine key, the status (``done``,
``failed`` with its error, ``skipped`` when an earlier run already produced it with the same engine and
the same input), timings in seconds and warnings. The JSON is authoritative (it also keeps each scan's
label volumes, so ``volumes.csv`` is rewritten from it); the CSV is the same rows for spreadsheets. Both
files, and ``volumes.csv``, are rewritten atomically after every scan, so a killed batch leaves the
manifest of the scans it finished.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from engine_tools.cache import atomic_file, write_json_atomic

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
VOLUMES_CSV = "volumes.csv"
MANIFEST_VERSION = 1
STATUSES = ("done", "failed", "skipped")

#: Columns of ``manifest.csv`` (rows of ``manifest.json`` carry these plus ``volumes`` and ``dice``).
CSV_COLUMNS = (
    "scan",
    "status",
    "input",
    "input_sha256",
    "output",
    "label_table",
    "engine_key",
    "error",
    "warnings",
    "started_at",
    "worker",
    "hash_s",
    "read_s",
    "preprocess_s",
    "inference_s",
    "resample_s",
    "write_s",
    "total_s",
)


class Manifest:
    """Rows keyed by scan id, loaded from and saved to one output folder."""

    def __init__(self, folder: str | Path, engine: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.engine = dict(engine or {})
        self.rows: dict[str, dict[str, Any]] = {}
        self.previous: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, folder: str | Path, engine: dict[str, Any] | None = None) -> Manifest:
        """The manifest of ``folder`` with the earlier run's rows in :attr:`previous` (empty if none)."""
        manifest = cls(folder, engine)
        path = manifest.folder / MANIFEST_JSON
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(
                    f"{path} is not a readable batch manifest ({exc}); move it away to start afresh"
                ) from exc
            manifest.previous = {row["scan"]: row for row in data.get("rows", [])}
        return manifest

    def already_done(
        self, scan: str, input_sha256: str, engine_key: str, window: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The earlier row of ``scan`` when it was done with the same input, engine and window
        settings and its output files are still there; else ``None``."""
        row = self.previous.get(scan)
        if not row or row.get("status") not in ("done", "skipped"):
            return None
        if row.get("input_sha256") != input_sha256 or row.get("engine_key") != engine_key:
            return None
        if window is not None and row.get("window") != window:
            return None
        outputs = [row.get("output"), row.get("label_table")]
        if not all(path and Path(path).is_file() for path in outputs):
            return None
        return row

    def record(self, row: dict[str, Any]) -> None:
        if row.get("status") not in STATUSES:
            raise ValueError(f"unknown status {row.get('status')!r}")
        self.rows[row["scan"]] = row

    def ordered_rows(self) -> list[dict[str, Any]]:
        """This run's rows, then earlier rows of scans this run did not list (kept, never lost)."""
        kept = [row for scan, row in self.previous.items() if scan not in self.rows]
        return sorted(self.rows.values(), key=lambda r: r["scan"]) + kept

    def counts(self) -> dict[str, int]:
        found = {status: 0 for status in STATUSES}
        for row in self.rows.values():
            found[row["status"]] += 1
        return found

    def save(self, label_names: list[tuple[int, str]], with_dice: bool = False) -> None:
        """Rewrite ``manifest.json``, ``manifest.csv`` and ``volumes.csv`` atomically."""
        rows = self.ordered_rows()
        write_json_atomic(
            self.folder / MANIFEST_JSON,
            {"version": MANIFEST_VERSION, "engine": self.engine, "counts": self.counts(), "rows": rows},
        )
        with atomic_file(self.folder / MANIFEST_CSV, "w") as stream:
            stream.write(manifest_csv(rows))
        with atomic_file(self.folder / VOLUMES_CSV, "w") as stream:
            stream.write(volumes_csv(rows, label_names, with_dice))


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return "" if value is None else value


def manifest_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        timings = row.get("timings", {})
        writer.writerow({key: _cell(row.get(key, timings.get(key))) for key in CSV_COLUMNS})
    return buffer.getvalue()


def volumes_csv(rows: list[dict[str, Any]], label_names: list[tuple[int, str]], with_dice: bool) -> str:
    """Wide table: one row per segmented scan, ``<label> mL`` and ``<label> voxels`` columns per label
    (background excluded), ``<label> Dice`` with a reference."""
    header = ["scan", "input", "voxel_volume_mL"]
    header += [f"{name} mL" for _, name in label_names]
    header += [f"{name} voxels" for _, name in label_names]
    if with_dice:
        header += [f"{name} Dice" for _, name in label_names]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        if row.get("status") == "failed" or not row.get("volumes"):
            continue
        by_value = {entry["value"]: entry for entry in row["volumes"]}
        empty = {"volume_ml": 0.0, "voxels": 0}
        cells = [row["scan"], row["input"], repr(row.get("voxel_volume_ml", ""))]
        cells += [round(float(by_value.get(v, empty)["volume_ml"]), 6) for v, _ in label_names]
        cells += [int(by_value.get(v, empty)["voxels"]) for v, _ in label_names]
        if with_dice:
            dice = row.get("dice") or {}
            cells += ["" if dice.get(str(v)) is None else repr(dice[str(v)]) for v, _ in label_names]
        writer.writerow(cells)
    return buffer.getvalue()
