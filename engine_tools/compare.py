"""FP32 versus BF16 versus INT8 on one engine, for one volume: what INT8 bought and what it cost.

:func:`compare_precisions` builds (or loads from the cache) one engine per precision on the same
backend, segments the volume with each, times ``engine.run`` on a fixed batch apart from the
segmentation, records peak resident memory, and measures agreement with the FP32 result (Dice per label
and logits SQNR) and, when given, with reference labels. :func:`engine_tools.report.write_report` turns the report into
``report.json``, ``report.md`` and ``chart.png`` (:mod:`engine_tools.report`); machine and measuring
helpers live in :mod:`engine_tools.machine` and :mod:`engine_tools.measure`.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine_tools.label_stats import reference_on_grid
from engine_tools.machine import machine_description, unsupported_reason
from engine_tools.measure import PeakMemory, centre_window, time_engine
from engine_tools.progress import Progress, SilentProgress
from engine_tools.report import findings, ratios

if TYPE_CHECKING:
    from engine_tools.calibration import CalibrationSet
    from engine_tools.engines.base import Engine
    from engine_tools.registry import ModelCard
    from engine_tools.spec import EngineSpec

MAX_KEPT_LOGITS_BYTES = 512 * 2**20


def _label_array(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image).astype(np.int64, copy=False)


def _num_label_values(card: Any) -> int:
    return max([card.num_classes, *(lab.value + 1 for lab in card.labels)])


@dataclass
class Baseline:
    """The FP32 outputs every other precision is compared with."""

    labels: np.ndarray | None = None
    window_logits: np.ndarray | None = None
    volume_logits: np.ndarray | None = None


@dataclass
class Measurement:
    """What one precision is measured on: a fixed batch for latency and, optionally, a whole volume."""

    batch: np.ndarray
    image: Any = None
    reference_labels: np.ndarray | None = None
    overlap: float | None = None
    keep_logits: bool = False
    warmup: int = 1
    repeats: int = 5


def ordered_precisions(precisions: Sequence[str]) -> list[str]:
    """FP32 first (the baseline, added when missing), then the others in the given order."""
    ordered = list(dict.fromkeys(precisions))
    if "fp32" not in ordered:
        ordered.insert(0, "fp32")
    return sorted(ordered, key=lambda p: 0 if p == "fp32" else 1)


def measure_precisions(
    card: ModelCard,
    spec: EngineSpec,
    precisions: Sequence[str],
    measurement: Measurement,
    progress: Progress,
    skip_unsupported: bool = True,
) -> dict[str, dict[str, Any]]:
    """One row per precision (FP32 first) on the backend of ``spec``: engine size, latency of
    ``measurement.batch``, and, with ``measurement.image``, a whole segmentation with its time, peak
    memory and agreement with FP32. A precision that cannot run here is a row with the reason."""
    from engine_tools.end_to_end import cached_load_s, end_to_end, worker_startup_s

    rows: dict[str, dict[str, Any]] = {}
    baseline = Baseline()
    precisions = ordered_precisions(precisions)
    startup = worker_startup_s(spec.backend)
    step = 1.0 / len(precisions)
    for index, precision in enumerate(precisions):
        with progress.span(index * step, (index + 1) * step):
            engine, rows[precision] = _prepare_row(card, spec, precision, progress, skip_unsupported)
            if engine is not None:
                _measure_row(engine, card, rows[precision], measurement, baseline, progress)
                del engine
                gc.collect()
                row = rows[precision]
                if "write_s" in row:  # command start to labelmap written, with the engine cached
                    load = cached_load_s(card, spec.for_precision(precision))
                    row["end_to_end"] = end_to_end(startup, load, row["segment_timings"], row["write_s"])
                    gc.collect()
        progress.update("compare", (index + 1) * step, f"{precision}: done")
    return rows


def _prepare_row(
    card: ModelCard, spec: EngineSpec, precision: str, progress: Progress, skip_unsupported: bool
) -> tuple[Engine | None, dict[str, Any]]:
    """The engine of one precision (built or cached) and its row; ``None`` and the reason when the
    backend or this CPU cannot run it (FP32 failing is an error)."""
    from engine_tools.pipeline import prepare_engine

    row: dict[str, Any] = {"precision": precision}
    skip = unsupported_reason(spec.backend, precision) if skip_unsupported else None
    if skip:
        row.update(status="unavailable", reason=skip)
        progress.warning(f"{precision} skipped: {skip}")
        return None, row
    progress.update("compare", 0.0, f"{precision}: preparing the {spec.backend} engine")
    try:
        started = time.perf_counter()
        with progress.span(0.0, 0.5):
            engine = prepare_engine(card, spec.for_precision(precision), progress)
        row["prepare_seconds"] = round(time.perf_counter() - started, 2)
    except Exception as exc:  # a precision this backend/CPU cannot do is a result, not a crash
        if precision == "fp32":
            raise
        row.update(status="unavailable", reason=f"{type(exc).__name__}: {exc}"[:500])
        progress.warning(f"{precision} on {spec.backend} unavailable: {exc}")
        return None, row
    described = engine.describe()
    row.update(
        status="ok",
        engine=described,
        bytes_on_disk=int(described.get("bytes_on_disk", 0)),
        cache=described.get("cache"),
        kept_in_higher_precision=described.get("kept_in_higher_precision"),
        accuracy_guard=described.get("accuracy_guard"),
        build_stage_seconds=(engine.build_report or {}).get("stage_seconds"),
        kernels=described.get("kernels"),
        files=_artifact_files(described.get("artifact_dir")),
    )
    return engine, row


def _measure_row(
    engine: Engine,
    card: ModelCard,
    row: dict[str, Any],
    measurement: Measurement,
    baseline: Baseline,
    progress: Progress,
) -> None:
    """Time, segment and compare one precision's engine; FP32 becomes the ``baseline``."""
    from engine_tools.accuracy import agreement_dice, json_ready, sqnr_db
    from engine_tools.end_to_end import write_seconds
    from engine_tools.segment import segment_image

    precision, num_values = row["precision"], _num_label_values(card)
    result = None
    with PeakMemory() as memory:
        if measurement.image is not None:
            progress.update("compare", 0.55, f"{precision}: segmenting")
            started = time.perf_counter()
            with progress.span(0.55, 0.85):
                result = segment_image(
                    engine,
                    card,
                    measurement.image,
                    progress=progress,
                    overlap=measurement.overlap,
                    keep_logits=measurement.keep_logits,
                )
            row["segment_seconds"] = round(time.perf_counter() - started, 3)
            row["segment_timings"] = getattr(result, "timings", None)
            row["write_s"] = write_seconds(result)
        progress.update("compare", 0.85, f"{precision}: timing {measurement.repeats} runs of one window")
        row["latency"] = time_engine(
            engine, measurement.batch, warmup=measurement.warmup, repeats=measurement.repeats
        )
        window_logits = np.asarray(engine.run(measurement.batch), dtype=np.float32)
    row["memory"] = memory.result()
    row["latency_ms_per_window"] = row["latency"]["median_ms_per_window"]
    labels = _label_array(result.labels) if result is not None else window_logits.argmax(1)
    volume_logits = getattr(result, "logits", None)
    if precision == "fp32":
        baseline.labels, baseline.window_logits, baseline.volume_logits = labels, window_logits, volume_logits
        row["fp32_volume_logits"] = volume_logits is not None
    else:
        row["agreement_vs_fp32"] = json_ready(agreement_dice(baseline.labels, labels, num_values))
        row["sqnr_db_window"] = _finite(sqnr_db(baseline.window_logits, window_logits))
        if volume_logits is not None and baseline.volume_logits is not None:
            row["sqnr_db_volume"] = _finite(sqnr_db(baseline.volume_logits, volume_logits))
    if measurement.reference_labels is not None and result is not None:
        row["dice_vs_reference"] = json_ready(
            agreement_dice(measurement.reference_labels, labels, num_values)
        )
    row["label_voxels"] = {
        str(v): int(c) for v, c in enumerate(np.bincount(labels.ravel(), minlength=num_values)) if c
    }


def compare_precisions(
    card: ModelCard,
    image: Any,
    spec: EngineSpec,
    precisions: Sequence[str] = ("fp32", "bf16", "int8"),
    reference: Any = None,
    progress: Progress | None = None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    overlap: float | None = None,
    input_path: str | None = None,
    skip_unsupported: bool = True,
) -> dict[str, Any]:
    """Segment ``image`` with every precision on the backend of ``spec`` and compare them.

    ``image`` and ``reference`` are ``SimpleITK.Image`` (reference labels use the card's label values);
    ``spec.calibration`` is needed for INT8 (each precision gets ``spec.for_precision``). Returns a
    JSON-ready report; precisions the backend cannot run here (or, with ``skip_unsupported``, that this
    CPU would only emulate) appear with ``"status": "unavailable"`` and the reason.
    """
    from engine_tools.engines import select_backend
    from engine_tools.volumes import preprocess

    progress = progress or SilentProgress()
    resolved, reason = select_backend(spec.backend)
    progress.log(f"backend: {resolved} ({reason})")
    prep = preprocess(image, card)
    for message in prep.steps.get("warnings", []):
        progress.warning(f"{card.id}: {message}")
    measurement = Measurement(
        batch=centre_window(np.asarray(prep.array, dtype=np.float32), card.window_size)[None],
        image=image,
        reference_labels=None if reference is None else _label_array(reference_on_grid(reference, image)[0]),
        overlap=overlap,
        # whole-volume logits SQNR only where FP32's logits fit comfortably in memory
        keep_logits=card.num_classes * int(np.prod(prep.array.shape[1:])) * 4 <= MAX_KEPT_LOGITS_BYTES,
        warmup=warmup,
        repeats=repeats,
    )
    spec = replace(spec, backend=resolved)
    rows = measure_precisions(card, spec, precisions, measurement, progress, skip_unsupported)
    report = {
        "model": {"id": card.id, "title": card.title, "num_classes": card.num_classes},
        "input": {"path": input_path, "size": list(image.GetSize()), "spacing": list(image.GetSpacing())},
        "backend": resolved,
        "backend_reason": reason,
        "precisions": list(rows),
        "machine": machine_description(),
        "latency_window": list(measurement.batch.shape),
        "rows": rows,
        "labels": {str(lab.value): lab.name for lab in card.labels},
        "calibration": _calibration_summary(spec.calibration),
        "validation": _calibration_summary(spec.validation),
        "reference": None if reference is None else "given",
    }
    from engine_tools.end_to_end import pytorch_one_pass

    progress.update("compare", 1.0, "PyTorch FP32 eager baseline (one pass)")
    report["pytorch_fp32_eager"] = pytorch_one_pass(card, prep, spec)
    report["ratios"] = ratios(rows)
    report["findings"] = findings(report)
    return report


def _artifact_files(artifact_dir: str | None) -> dict[str, int]:
    """Bytes of each file of the engine artifact (the cache's own metadata file excluded)."""
    from engine_tools.engines.base import METADATA_FILE

    if not artifact_dir or not Path(artifact_dir).is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for p in sorted(Path(artifact_dir).iterdir())
        if p.is_file() and p.name != METADATA_FILE
    }


def _finite(value: float) -> float | None:
    return round(float(value), 3) if math.isfinite(value) else (None if math.isnan(value) else float(value))


def _calibration_summary(calibration: CalibrationSet | None) -> dict[str, Any] | None:
    return None if calibration is None else calibration.describe()
