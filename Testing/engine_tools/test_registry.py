"""Bring-your-own models (a real ONNX file), the user card folder and the models/fetch CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from shared_data import shared_path

from engine_tools.cli import main
from engine_tools.networks import NetworkError, build_network, export_onnx, validate_onnx
from engine_tools.networks.byo import add_user_model
from engine_tools.registry import CardError, get_card, load_cards, user_cards_dir
from engine_tools.weights import ChecksumMismatch


@pytest.fixture
def user_onnx(tmp_path: Path) -> Path:
    copy = tmp_path / "gwm_meshnet.onnx"
    shutil.copyfile(shared_path("models", "niivue", "gwm_meshnet.onnx"), copy)
    return copy


def test_add_user_onnx_model(user_onnx: Path, isolated_cache: Path) -> None:
    before = user_onnx.read_bytes()
    card = add_user_model(user_onnx, labels="background,white matter,grey matter", modality="MR")
    assert card.path == user_cards_dir() / f"{card.id}.json" and card.path.is_relative_to(isolated_cache)
    assert card.window_size == (256, 256, 256)  # the network's fixed input
    assert [lab.name for lab in card.labels] == ["background", "white matter", "grey matter"]
    assert get_card(card.id).id == card.id and card.id in load_cards()
    # the exported network is the user's file with the contract's I/O names
    exported = export_onnx(card)
    info = validate_onnx(exported)
    assert info["input"] == "input" and info["outputs"] == ["logits"] and info["opset"] == 14
    assert info["input_shape"][1:] == [1, 256, 256, 256]
    with pytest.raises(NetworkError, match="no PyTorch module"):
        build_network(card)
    assert user_onnx.read_bytes() == before  # never modified
    with pytest.raises(CardError, match="exists"):
        add_user_model(user_onnx, labels=3)
    # a changed file is refused, not silently used
    user_onnx.write_bytes(before + b"\0")
    with pytest.raises(ChecksumMismatch):
        export_onnx(get_card(card.id))


def test_add_user_model_bad_inputs(tmp_path: Path, user_onnx: Path) -> None:
    with pytest.raises(CardError, match="not found"):
        add_user_model(tmp_path / "missing.onnx", labels=2)
    (tmp_path / "net.txt").write_text("x")
    with pytest.raises(CardError, match="unknown model file type"):
        add_user_model(tmp_path / "net.txt", labels=2)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(NetworkError, match="not a valid ONNX"):
        add_user_model(tmp_path / "junk.onnx", labels=2)
    with pytest.raises(CardError, match="2 labels given but the network outputs 3"):
        add_user_model(user_onnx, labels="a,b")
    with pytest.raises(CardError, match="already used"):
        add_user_model(user_onnx, model_id="brainchop-model18cls", labels=3)


def test_cli_models_add_list_and_fetch(user_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror = shared_path("models", "brainchop")
    assert (
        main(
            [
                "models",
                "add",
                "--file",
                str(user_onnx),
                "--id",
                "my-gwm",
                "--labels",
                "bg,wm,gm",
                "--progress",
                "none",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["models", "--json", "--weights-dir", str(mirror)]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    assert rows["my-gwm"]["weights_present"] and rows["my-gwm"]["network_format"] == "onnx"
    assert rows["brainchop-model18cls"]["weights_present"]
    assert rows["brainchop-model18cls"]["weights_files"]["model.bin"] == str(
        mirror / "model18cls" / "model.bin"
    )
    assert main(["fetch", "brainchop-model5_gw_ae", "--weights-dir", str(mirror), "--progress", "jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "result"
    assert set(events[-1]["data"]["fetched"]["brainchop-model5_gw_ae"]) == {
        "model.json",
        "group1-shard1of1.bin",
    }
    assert any(e["event"] == "progress" for e in events)
    # offline, no mirror, empty cache: a clear error naming the URL and --weights-dir
    assert main(["fetch", "brainchop-model5_gw_ae", "--offline", "--progress", "jsonl"]) == 1
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert error["event"] == "error" and "--weights-dir" in error["message"]
    assert "raw.githubusercontent.com/neuroneural/brainchop" in error["message"]
