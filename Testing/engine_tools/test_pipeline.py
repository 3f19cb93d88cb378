"""prepare_engine: engine cache (key, hit, rebuild), atomicity on cancel, clear errors; `medquant build`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import small_card
from shared_data import shared_path

pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")

from engine_tools.cache import cache_dir, partial_artifacts  # noqa: E402
from engine_tools.calibration import CalibrationSet  # noqa: E402
from engine_tools.engines import METADATA_FILE  # noqa: E402
from engine_tools.pipeline import cached_engines, prepare_engine  # noqa: E402
from engine_tools.progress import Cancelled, SilentProgress  # noqa: E402

WINDOW = 32


@pytest.fixture
def brainchop() -> Path:
    return shared_path("models", "brainchop")


@pytest.fixture
def card():
    return small_card("brainchop-model5_gw_ae", WINDOW)


def _windows(count: int, seed: int = 0) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    return CalibrationSet.from_windows(rng.random((count, 1, WINDOW, WINDOW, WINDOW), dtype=np.float32))


def test_int8_without_calibration_is_a_clear_error(card, brainchop: Path) -> None:
    with pytest.raises(ValueError, match="needs a folder of unlabeled scans"):
        prepare_engine(card, backend="openvino", precision="int8", weights_dir=brainchop)


def test_cache_key_hit_and_rebuild(card, brainchop: Path, isolated_cache: Path) -> None:
    windows = _windows(4)
    stages: list[str] = []

    class Recorder(SilentProgress):
        def emit(self, event: dict) -> None:
            super().emit(event)
            if event["event"] == "progress":
                stages.append(event["stage"])

    first = prepare_engine(
        card,
        backend="openvino",
        precision="int8",
        calibration=windows,
        weights_dir=brainchop,
        progress=Recorder(),
    )
    assert first.describe()["cache"] == "built"
    assert {"export", "calibrate", "quantize", "compile"} <= set(stages)
    metadata = json.loads((first.artifact_dir / METADATA_FILE).read_text())
    assert metadata["key_parts"]["precision"] == "int8" and metadata["key_parts"]["backend"] == "openvino"
    assert metadata["key_parts"]["calibration"] and metadata["build_report"]["accuracy_guard"]

    again = prepare_engine(
        card, backend="openvino", precision="int8", calibration=windows, weights_dir=brainchop
    )
    assert again.describe()["cache"] == "hit"
    assert again.artifact_dir == first.artifact_dir
    assert again.describe()["accuracy_guard"] == first.describe()["accuracy_guard"]
    np.testing.assert_array_equal(again.run(windows.windows[:1]), first.run(windows.windows[:1]))

    # other calibration windows, method or precision → other engines
    other = prepare_engine(
        card, backend="openvino", precision="int8", calibration=_windows(4, seed=1), weights_dir=brainchop
    )
    fp32 = prepare_engine(card, backend="openvino", precision="fp32", weights_dir=brainchop)
    assert len({first.artifact_dir, other.artifact_dir, fp32.artifact_dir}) == 3
    assert len(cached_engines()) == 3

    rebuilt = prepare_engine(card, backend="openvino", precision="fp32", weights_dir=brainchop, rebuild=True)
    assert rebuilt.describe()["cache"] == "built" and rebuilt.artifact_dir == fp32.artifact_dir
    assert partial_artifacts(isolated_cache) == []


@pytest.mark.parametrize("stop_at", ["quantize", "IR saved"])
def test_cancelled_build_leaves_nothing(card, brainchop: Path, isolated_cache: Path, stop_at: str) -> None:
    class CancelAt(SilentProgress):
        def update(self, stage: str, fraction=None, message: str = "") -> None:
            if stop_at in (stage, message) or stop_at in message:
                raise Cancelled(f"cancelled during {stage}")
            super().update(stage, fraction, message)

    with pytest.raises(Cancelled):
        prepare_engine(
            card,
            backend="openvino",
            precision="int8",
            calibration=_windows(3),
            weights_dir=brainchop,
            progress=CancelAt(),
        )
    assert partial_artifacts(isolated_cache) == []
    assert not list(cache_dir("engines").glob(f"*/{METADATA_FILE}"))
    assert not [p for p in cache_dir("engines").iterdir()]


def test_medquant_build_cli_jsonl(brainchop: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine_tools.cli import main

    card = small_card("brainchop-model5_gw_ae", WINDOW)
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(card.raw))
    code = main(
        [
            "build",
            str(card_file),
            "--precision",
            "fp32",
            "--backend",
            "openvino",
            "--progress",
            "jsonl",
            "--weights-dir",
            str(brainchop),
        ]
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0, events[-1]
    result = events[-1]
    assert result["event"] == "result"
    engine = result["data"]["engine"]
    assert engine["precision"] == "fp32" and engine["bytes_on_disk"] > 0 and engine["cache"] == "built"
    code = main(
        [
            "build",
            str(card_file),
            "--precision",
            "int8",
            "--progress",
            "jsonl",
            "--weights-dir",
            str(brainchop),
        ]
    )
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 1 and error["event"] == "error" and "unlabeled scans" in error["message"]
