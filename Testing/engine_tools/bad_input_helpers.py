"""Shared set-up of the bad-input tests: a small real MeshNet card, tiny volumes, the CLI as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from shared_data import shared_path

from engine_tools.progress import validate_event
from engine_tools.registry import get_card

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = shared_path("models", "brainchop", "model5_gw_ae")
WINDOW = 16
SIZE = 24


def tiny_card(folder: Path) -> Path:
    """brainchop model5 (real weights) at a 16^3 window on the input grid, receptive field 12 voxels."""
    raw = json.loads(json.dumps(get_card("brainchop-model5_gw_ae").raw))
    raw["id"] = "tiny-meshnet"
    raw["preprocessing"] = {
        "orientation": None,
        "spacing": None,
        "shape": None,
        "intensity": {"rule": "quantile", "lower": 0.0, "upper": 1.0},
    }
    raw["window"] = {"size": [WINDOW] * 3, "overlap": 0.25, "blend": "gaussian", "batch": 1}
    raw["network"]["receptive_field"] = 12
    raw["quantization"] = {"calibration_windows": 4}
    path = folder / "tiny-meshnet.json"
    path.write_text(json.dumps(raw))
    return path


def head_like(seed: int = 0, size: int = SIZE) -> np.ndarray:
    """A bright blob with texture in a dark background (MR-like intensities), ``(k, j, i)`` order."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32) - size / 2
    blob = (np.sqrt((grid**2).sum(0)) < size / 3).astype(np.float32)
    return (blob * 400 + rng.random((size,) * 3, dtype=np.float32) * 60).astype(np.float32)


def write_volume(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def calibration_folder(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        write_volume(folder / f"scan{index}.nii.gz", head_like(index + 1))
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partial_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(".partial-*")]


def cli_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MEDQUANT_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}


def medquant_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine_tools", *args, "--progress", "jsonl"]


def parse_events(stdout: str) -> list[dict]:
    """Every stdout line is a valid event; exactly one final result/error, and it is the last."""
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for event in events:
        validate_event(event)
    finals = [e for e in events if e["event"] in ("result", "error")]
    assert events and finals == [events[-1]], f"not exactly one final event: {finals}"
    return events


def run_cli(*args: str, cache: Path, timeout: float = 300) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        medquant_command(*args), cwd=REPO, env=cli_env(cache), capture_output=True, text=True, timeout=timeout
    )
    assert proc.stdout.strip(), f"no events; stderr:\n{proc.stderr[-2000:]}"
    return proc.returncode, parse_events(proc.stdout)


def warnings_of(events: list[dict]) -> list[str]:
    return [e["message"] for e in events if e["event"] == "log" and e["level"] == "warning"]


def build_args(card: Path, *extra: str) -> list[str]:
    return ["build", str(card), "--weights-dir", str(WEIGHTS), "--backend", "openvino", *extra]


def segment_args(card: Path, source: Path, output: Path, *extra: str) -> list[str]:
    return [
        "segment", str(card), "-i", str(source), "-o", str(output), "--weights-dir", str(WEIGHTS),
        "--backend", "openvino", "--precision", "fp32", *extra,
    ]  # fmt: skip
