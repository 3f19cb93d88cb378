"""End-to-end time of one segmentation as a user sees it, beside ``compare``'s per-window latency.

The time from ``medquant segment`` starting to the labelmap on disk is the sum of: the worker's
start-up (a fresh Python importing the segment path and OpenVINO, :func:`worker_startup_s`), loading
the cached engine (:func:`cached_load_s`), preprocessing, inference and resampling (the segmentation's
own timings) and writing the labelmap with its label table (:func:`write_seconds`). The baseline users
have today is PyTorch FP32 eager; :func:`pytorch_one_pass` times the card's network on the same
(head-cropped) volume in one pass, where the network is fully convolutional (exact), a lower bound of
PyTorch's end-to-end time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from engine_tools.registry import ModelCard
    from engine_tools.segment import SegmentationResult
    from engine_tools.spec import EngineSpec
    from engine_tools.volumes import Preprocessed

#: what a segment worker imports before its first event
STARTUP_IMPORTS = (
    "import engine_tools.cli, engine_tools.commands.segment, engine_tools.segment, engine_tools.pipeline"
)


def worker_startup_s(backend: str) -> float:
    """Seconds for a fresh Python to import the segment path and the backend's runtime."""
    runtime = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}.get(
        backend, "torch"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"{STARTUP_IMPORTS}, {runtime}"], env=env, check=True)
    return round(time.perf_counter() - started, 3)


def cached_load_s(card: ModelCard, spec: EngineSpec) -> float:
    """Seconds to take the (already built) engine of ``spec`` from the cache and load it."""
    from engine_tools.pipeline import prepare_engine

    started = time.perf_counter()
    engine = prepare_engine(card, spec)
    seconds = time.perf_counter() - started
    del engine
    return round(seconds, 3)


def write_seconds(result: SegmentationResult) -> float:
    """Seconds to write the labelmap (NIfTI, compressed) and its label table, as ``segment`` does."""
    from engine_tools.segment import write_segmentation

    with tempfile.TemporaryDirectory(prefix="medquant-e2e-") as folder:
        started = time.perf_counter()
        write_segmentation(result, Path(folder) / "labels.nii.gz")
        return round(time.perf_counter() - started, 3)


def end_to_end(startup_s: float, load_s: float, timings: dict[str, Any], write_s: float) -> dict[str, Any]:
    """The stages and their sum: command start to labelmap written, engine cached."""
    stages = {
        "startup_s": startup_s,
        "engine_load_s": load_s,
        "preprocess_s": timings.get("preprocess_s"),
        "inference_s": timings.get("inference_s"),
        "resample_s": timings.get("resample_s"),
        "write_s": write_s,
    }
    stages["total_s"] = round(sum(float(v or 0.0) for v in stages.values()), 3)
    stages["mode"] = timings.get("mode")
    return stages


def pytorch_one_pass(card: ModelCard, prep: Preprocessed, spec: EngineSpec) -> dict[str, Any]:
    """PyTorch FP32 eager, one pass of the card's network over the volume the engines run on (the
    head crop), or why it is not measured (networks that need sliding windows)."""
    if not card.network.get("fully_convolutional"):
        return {"skipped": "the network is not fully convolutional: no exact one-pass baseline"}
    import torch

    from engine_tools.networks import build_network
    from engine_tools.whole_volume import plan_crop

    crop = plan_crop(card, prep.array)
    volume = torch.from_numpy(np.ascontiguousarray(prep.array[(slice(None), *crop.slices)])[None])
    module = build_network(card, weights_dir=spec.weights_dir, random_weights=spec.random_weights)
    with torch.inference_mode():
        started = time.perf_counter()
        module(volume)
        seconds = time.perf_counter() - started
    return {"one_pass_s": round(seconds, 3), "shape": list(crop.shape), "threads": torch.get_num_threads()}
