"""`medquant demo` from a plain checkout: no ``../shared`` folder, every file fetched from the URLs of
the data card and the model card, here served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_data import REPO, shared_path

from engine_tools.progress import validate_event
from engine_tools.registry import DATA_CARDS_ENV, get_card, get_data_card

MODEL = "brainchop-model11_gw_ae"


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        type(self).hits.append(self.path)
        super().do_GET()


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[tuple[str, type[_CountingHandler]]]:
    """The published files (demo scans and model11 weights, from ../shared) behind a local server."""
    served = tmp_path / "served"
    served.mkdir()
    for entry in get_data_card("demo").files:
        (served / entry["name"]).symlink_to(shared_path("data", "mri", entry["name"]))
    for entry in get_card(MODEL).weights["files"]:
        (served / entry["name"]).symlink_to(
            shared_path("models", "brainchop", "model11_gw_ae", entry["name"])
        )
    handler = type("Handler", (_CountingHandler,), {"hits": []})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _redirect(entries: list[dict], base: str) -> list[dict]:
    """The card's entries (same pins) with their URLs moved to the local server."""
    return [{**entry, "url": f"{base}/{entry['name']}"} for entry in entries]


def _cards(tmp_path: Path, base: str, data_sha: str | None = None) -> Path:
    """A data-card folder replacing the shipped demo card, and a small-grid copy of the model card."""
    data = json.loads((REPO / "Resources" / "DataCards" / "demo.json").read_text())
    data["files"] = _redirect(data["files"], base)
    if data_sha:
        data["files"][0]["sha256"] = data_sha
    (tmp_path / "datacards").mkdir(exist_ok=True)
    (tmp_path / "datacards" / "demo.json").write_text(json.dumps(data))
    model = json.loads(get_card(MODEL).path.read_text())
    model["weights"]["files"] = _redirect(model["weights"]["files"], base)
    # the same network on a 4 mm, 64^3 grid in one window: the demo's code path in seconds on a CPU
    model["preprocessing"].update(spacing=[4.0, 4.0, 4.0], shape=[64, 64, 64])
    model["window"]["size"] = [64, 64, 64]
    card = tmp_path / "model11-local.json"
    card.write_text(json.dumps(model))
    return card


def _demo(tmp_path: Path, card: Path) -> tuple[int, list[dict]]:
    env = {
        **os.environ,
        "MEDQUANT_SHARED": str(tmp_path / "empty"),  # a plain clone: no shared folder
        DATA_CARDS_ENV: str(tmp_path / "datacards"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for key in ("MEDQUANT_WEIGHTS_DIR", "MEDQUANT_OFFLINE"):
        env.pop(key, None)
    (tmp_path / "empty").mkdir(exist_ok=True)
    args = ["--model", str(card), "--precisions", "fp32,int8", "--windows", "2", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine_tools", "demo", *args, "-o", "report", "--progress", "jsonl"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    for event in events:
        validate_event(event)
    assert events, proc.stderr[-3000:]
    return proc.returncode, events


def test_demo_from_a_plain_clone_downloads_verifies_and_caches(tmp_path, publisher, isolated_cache):
    base, handler = publisher
    code, events = _demo(tmp_path, _cards(tmp_path, base))
    assert code == 0, events[-1]
    names = [entry["name"] for entry in get_data_card("demo").files]
    weights = [entry["name"] for entry in get_card(MODEL).weights["files"]]
    assert sorted(handler.hits) == sorted(f"/{name}" for name in names + weights)
    downloads = [e for e in events if e["event"] == "progress" and e["stage"] == "download"]
    assert {
        n for n in names if any(n in e["message"] and "verified" in e["message"] for e in downloads)
    } == set(names)
    for entry in get_data_card("demo").files:  # in the cache, byte-identical to the pinned files
        cached = isolated_cache / "data" / "demo" / entry["name"]
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == entry["sha256"]
    report = events[-1]["data"]
    assert report["input"]["path"] == str(isolated_cache / "data" / "demo" / "t1_crop.nii.gz")
    assert report["input"]["size"] == [256, 256, 256]
    assert {p: row["status"] for p, row in report["rows"].items()} == {"fp32": "ok", "int8": "ok"}
    assert report["rows"]["int8"]["engine"]["kernels"]["convolutions"]["int8"] >= 1
    assert report["calibration"]["files_used"] == [names[1]]  # another subject than the scan
    link = isolated_cache / "demo-calibration" / names[1]
    assert link.resolve() == (isolated_cache / "data" / "demo" / names[1]).resolve()
    assert (tmp_path / "report" / "report.json").is_file()


def test_demo_refuses_a_scan_that_fails_its_pin(tmp_path, publisher, isolated_cache):
    base, handler = publisher
    code, events = _demo(tmp_path, _cards(tmp_path, base, data_sha="0" * 64))
    assert code == 1 and events[-1]["error_type"] == "ChecksumMismatch", events[-1]
    assert "t1_crop.nii.gz" in events[-1]["message"] and "not kept" in events[-1]["message"]
    assert handler.hits == ["/t1_crop.nii.gz"]
    assert not any((isolated_cache / "data").rglob("*.nii.gz"))
    assert not (tmp_path / "report").exists()


def test_fetch_demo_data_prepares_an_offline_demo(tmp_path, publisher, isolated_cache, monkeypatch, capsys):
    from engine_tools.cli import main

    base, handler = publisher
    _cards(tmp_path, base)
    monkeypatch.setenv("MEDQUANT_SHARED", str(tmp_path / "empty"))
    monkeypatch.setenv(DATA_CARDS_ENV, str(tmp_path / "datacards"))
    monkeypatch.delenv("MEDQUANT_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("MEDQUANT_OFFLINE", raising=False)
    assert main(["fetch", "--demo-data", "--progress", "jsonl"]) == 0
    fetched = json.loads(capsys.readouterr().out.splitlines()[-1])["data"]["fetched"]["demo"]
    folder = isolated_cache / "data" / "demo"
    assert fetched == {entry["name"]: str(folder / entry["name"]) for entry in get_data_card("demo").files}
    assert len(handler.hits) == 2
    # afterwards offline: served from the cache, the server is not asked again
    assert main(["fetch", "--demo-data", "--offline", "--progress", "none"]) == 0
    assert len(handler.hits) == 2
