"""Segment a volume with any engine: preprocess, sliding windows, argmax, back to the input grid.

:func:`segment_image` runs MONAI's ``sliding_window_inference`` (window size from the card, overlap,
Gaussian blending, batches of windows) with ``engine.predictor()`` as the network, reports progress
per batch (and honours cancellation through :meth:`Progress.update`; a volume that is exactly one
window goes to ``engine.run`` in NumPy, without PyTorch or MONAI), takes the argmax in network space
and resamples the labels onto the input image's exact grid (:func:`engine_tools.volumes.to_input_geometry`).
:func:`write_segmentation` writes the labelmap plus its label table (``.labels.json`` and ``.labels.csv``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from engine_tools.accuracy import class_argmax
from engine_tools.cache import atomic_file, write_json_atomic
from engine_tools.progress import Progress
from engine_tools.volumes import (
    Preprocessed,
    image_suffix,
    preprocess,
    read_image,
    to_input_geometry,
    write_image,
)
from engine_tools.whole_volume import Crop, place_indices, plan_crop, whole_volume_applies

if TYPE_CHECKING:
    from engine_tools.engines.base import Engine
    from engine_tools.registry import ModelCard


@dataclass
class SegmentationResult:
    """Labels in the input geometry plus what produced them.

    ``labels``: SimpleITK label image on the input grid (values are the card's label values).
    ``network_labels``: the same labels on the network grid ``(D, H, W)`` (``Preprocessed`` order).
    ``logits``: float32 ``(K, D, H, W)`` blended logits on the network grid when ``keep_logits``.
    ``timings``: seconds (``preprocess_s``, ``inference_s``, ``resample_s``, ``total_s``), window count,
    batch size, ``window_latencies_s`` (seconds per window of each batch) and their median.
    """

    labels: sitk.Image
    label_table: list[dict[str, Any]]
    timings: dict[str, Any]
    network_labels: np.ndarray
    prep: Preprocessed
    model_id: str = ""
    logits: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


def scan_positions(image_size: int, roi: int, overlap: float) -> int:
    """Windows along one axis as MONAI's sliding window places them (after padding to ``roi``)."""
    size = max(image_size, roi)
    if size == roi:
        return 1
    interval = max(int(roi * (1 - overlap)), 1)
    return math.ceil((size - roi) / interval) + 1


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    return math.prod(scan_positions(s, r, overlap) for s, r in zip(shape, roi, strict=True))


def segment_image(
    engine: Engine,
    card: ModelCard,
    image: sitk.Image | str | Path | Preprocessed,
    progress: Progress | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    keep_logits: bool = False,
    predictor: Callable[[Any], Any] | None = None,
    whole_volume: bool | None = None,
) -> SegmentationResult:
    """Segment ``image`` (SimpleITK image, path, or an already :class:`Preprocessed` volume).

    ``overlap`` and ``batch_size`` default to the card's ``window`` entry (0.5 and 1); a volume
    smaller than the window is padded as ``window.padding_mode`` says (``constant`` zeros by default,
    ``replicate`` for edge replication as MONAI's ``SlidingWindowInferer``). ``predictor``
    replaces ``engine.predictor()`` (any callable from a torch ``N, C, D, H, W`` batch to logits).
    ``whole_volume`` (default: where :func:`whole_volume_applies`) runs one pass over the head's
    bounding box grown by the receptive-field radius instead of sliding windows; ``logits`` then
    cover that crop (``timings["crop"]``).
    """
    started = time.perf_counter()
    prep, warnings = _preprocessed(image, card, progress)
    preprocessed = time.perf_counter()
    roi, overlap, batch_size = _window_settings(card, overlap, batch_size)
    latencies: list[float] = []
    crop = None
    logits = None
    if whole_volume_applies(card, engine) if whole_volume is None else whole_volume:
        crop = plan_crop(card, prep.array)
        done = 1
        if predictor is None and not keep_logits:  # the engine's arg-max: no logits written out
            labels, channels = _one_pass(engine.run_labels, prep, crop, latencies, progress)
            indices = labels[0]
        else:
            run = engine.run if predictor is None else _numpy_network(predictor)
            logits = np.asarray(_one_pass(run, prep, crop, latencies, progress), dtype=np.float32)[0]
    elif predictor is None and prep.spatial_shape == roi:  # one window is the volume: no torch/MONAI
        whole = Crop((0, 0, 0), prep.spatial_shape)  # type: ignore[arg-type]
        if progress is not None:
            progress.update("segment", 0.0, "window 1/1")
        logits = np.asarray(_one_pass(engine.run, prep, whole, latencies, None), dtype=np.float32)[0]
        done = 1
    else:
        network = predictor or engine.predictor()
        logits, done = _sliding_logits(network, prep, card, roi, overlap, batch_size, latencies, progress)
        logits = logits[0].float().numpy()
    if logits is not None:
        channels = logits.shape[0]
        indices = class_argmax(logits[None])[0]  # one class at a time: no class-last copy
    if channels != card.num_classes:
        raise ValueError(
            f"{card.id}: the network returned {channels} channels but the card lists "
            f"{card.num_classes} classes"
        )
    kept = np.ascontiguousarray(logits, dtype=np.float32) if keep_logits else None
    del logits
    if crop is not None:
        indices = place_indices(indices, crop, prep.spatial_shape)
    network_labels = class_values(card)[indices] if _needs_lookup(card) else indices
    inferred = time.perf_counter()
    if progress is not None:
        progress.update("segment", 1.0, "resampling labels to the input grid")
    labels = to_input_geometry(network_labels, prep)
    finished = time.perf_counter()
    timings = {
        "preprocess_s": round(preprocessed - started, 4),
        "inference_s": round(inferred - preprocessed, 4),
        "resample_s": round(finished - inferred, 4),
        "total_s": round(finished - started, 4),
        "num_windows": done,
        "mode": "windows" if crop is None else "whole_volume",
        "crop": None if crop is None else crop.to_json(),
        "batch_size": batch_size,
        "overlap": overlap,
        "window": list(roi),
        "window_latencies_s": [round(t, 5) for t in latencies],
        "median_window_latency_s": round(statistics.median(latencies), 5) if latencies else None,
    }
    return SegmentationResult(
        labels=labels,
        label_table=card.label_table(),
        timings=timings,
        network_labels=network_labels,
        prep=prep,
        model_id=card.id,
        logits=kept,
        warnings=warnings,
    )


def _sliding_logits(
    network: Callable[[Any], Any],
    prep: Preprocessed,
    card: ModelCard,
    roi: tuple[int, ...],
    overlap: float,
    batch_size: int,
    latencies: list[float],
    progress: Progress | None,
) -> tuple[Any, int]:
    """Logits ``1, K, D, H, W`` of the whole preprocessed volume (MONAI sliding windows, blended as the
    card says) and the number of windows run; seconds per window of each call go to ``latencies``."""
    import torch
    from monai.inferers import sliding_window_inference

    total = count_windows(prep.spatial_shape, roi, overlap)
    done = 0

    def counted(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if progress is not None:
            progress.update("segment", done / total, f"window {done + 1}/{total}")
        tick = time.perf_counter()
        logits = network(batch)
        latencies.append((time.perf_counter() - tick) / batch.shape[0])
        done += int(batch.shape[0])
        return logits

    volume = torch.from_numpy(prep.array[None])
    with torch.inference_mode():
        if prep.spatial_shape == roi:  # whole conformed volume: no blending buffers needed
            return counted(volume), done
        logits = sliding_window_inference(
            volume,
            roi_size=roi,
            sw_batch_size=batch_size,
            predictor=counted,
            overlap=overlap,
            mode=str(card.window.get("blend", "gaussian")),
            padding_mode=str(card.window.get("padding_mode", "constant")),
            cval=0.0,
        )
    return logits, done


def _one_pass(
    network: Callable[[np.ndarray], Any],
    prep: Preprocessed,
    crop: Crop,
    latencies: list[float],
    progress: Progress | None,
) -> Any:
    """What ``network`` gives (numpy in, as ``Engine.run`` or ``Engine.run_labels``) for one pass over
    ``crop`` of the preprocessed volume, ``1, C, d, h, w``."""
    if progress is not None:
        progress.update("segment", 0.0, f"one pass over {'x'.join(map(str, crop.shape))} voxels")
    volume = np.ascontiguousarray(prep.array[(slice(None), *crop.slices)], dtype=np.float32)[None]
    tick = time.perf_counter()
    output = network(volume)
    latencies.append(time.perf_counter() - tick)
    return output


def _numpy_network(predictor: Callable[[Any], Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A torch predictor as a numpy function (``N, C, D, H, W`` in, logits out)."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return predictor(torch.from_numpy(batch)).float().numpy()

    return run


def _preprocessed(
    image: sitk.Image | str | Path | Preprocessed, card: ModelCard, progress: Progress | None
) -> tuple[Preprocessed, list[str]]:
    """``image`` in network space, and the preprocessing warnings (also sent to ``progress``)."""
    if isinstance(image, Preprocessed):
        return image, []
    if not isinstance(image, sitk.Image):
        image = read_image(image)
    if progress is not None:
        progress.update("segment", 0.0, "preprocessing")
    prep = preprocess(image, card)
    warnings = list(prep.steps.get("warnings", []))
    if progress is not None:
        for message in warnings:
            progress.warning(f"{card.id}: {message}")
    return prep, warnings


def _window_settings(
    card: ModelCard, overlap: float | None, batch_size: int | None
) -> tuple[tuple[int, ...], float, int]:
    """``(window, overlap, batch size)``: the arguments, else the card's ``window`` entry; checked."""
    roi = tuple(int(s) for s in card.window_size)
    overlap = float(card.window.get("overlap", 0.5) if overlap is None else overlap)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    batch_size = int(card.window.get("batch", 1) if batch_size is None else batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return roi, overlap, batch_size


def class_values(card: ModelCard) -> np.ndarray:
    """Label value of each network output channel (channel ``k`` → ``card.labels[k].value``)."""
    return np.asarray([label.value for label in card.labels], dtype=np.int64)


def _needs_lookup(card: ModelCard) -> bool:
    values = [label.value for label in card.labels]
    return len(values) == card.num_classes and values != list(range(len(values)))


def label_table_paths(output: str | Path) -> tuple[Path, Path]:
    """``OUT.nii.gz`` → (``OUT.labels.json``, ``OUT.labels.csv``)."""
    output = Path(output)
    suffix = image_suffix(output)
    stem = output.name[: -len(suffix)] if suffix and output.name.lower().endswith(suffix) else output.name
    return output.with_name(stem + ".labels.json"), output.with_name(stem + ".labels.csv")


def label_table_csv(table: list[dict[str, Any]]) -> str:
    """``value,name,r,g,b`` rows (header first)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["value", "name", "r", "g", "b"])
    for entry in table:
        writer.writerow([entry["value"], entry["name"], *entry["color"][:3]])
    return buffer.getvalue()


def write_segmentation(
    result: SegmentationResult, path: str | Path, overwrite: bool = False
) -> dict[str, Path]:
    """Write the labelmap (NIfTI/NRRD/MHA by ending) and its label table (JSON and CSV) beside it.

    Nothing is written when any of the three files exists and ``overwrite`` is false.
    """
    path = Path(path)
    json_path, csv_path = label_table_paths(path)
    if not overwrite:
        for target in (path, json_path, csv_path):
            if target.exists():
                raise FileExistsError(f"{target} exists; choose another output name or allow overwriting")
    write_image(result.labels, path, overwrite=overwrite)
    write_json_atomic(json_path, {"model": result.model_id, "labels": result.label_table})
    with atomic_file(csv_path, "w") as stream:
        stream.write(label_table_csv(result.label_table))
    return {"labels": path, "label_table_json": json_path, "label_table_csv": csv_path}
