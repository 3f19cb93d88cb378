"""Weights fetching against a real HTTP server on 127.0.0.1 and local mirrors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_tools.cache import partial_artifacts
from engine_tools.progress import SilentProgress
from engine_tools.registry import ModelCard
from engine_tools.weights import (
    OFFLINE_ENV,
    WEIGHTS_ENV,
    ChecksumMismatch,
    WeightsUnavailable,
    ensure_weights,
    locate_weights,
    weights_cache_dir,
    weights_present,
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []
    truncate: set[str] = set()

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        type(self).hits.append(self.path)
        name = self.path.lstrip("/")
        if name in type(self).truncate:  # announce the full length, send half, hang up
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, type[_Handler]]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"hits": [], "truncate": set()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _card(files: list[dict], model_id: str = "test-model") -> ModelCard:
    return ModelCard.from_dict(
        {
            "id": model_id,
            "title": "t",
            "task": "t",
            "modality": "MR",
            "labels": [{"value": 0, "name": "bg"}],
            "preprocessing": {},
            "window": {"size": [8, 8, 8]},
            "network": {"format": "onnx", "file": "a.bin"},
            "weights": {"files": files, "licence": "MIT"},
        }
    )


def _entry(root: Path, base: str, name: str, data: bytes, **extra: object) -> dict:
    (root / name).write_bytes(data)
    return {
        "name": name,
        "url": f"{base}/{name}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        **extra,
    }


def test_download_verifies_reports_progress_and_caches(server, isolated_cache: Path) -> None:
    base, root, handler = server
    data = bytes(range(256)) * 12_000  # ~3 MB: several progress events
    card = _card([_entry(root, base, "a.bin", data)])
    assert not weights_present(card)
    progress = SilentProgress()
    paths = ensure_weights(card, progress=progress)
    assert paths["a.bin"] == weights_cache_dir(card) / "a.bin"
    assert paths["a.bin"].read_bytes() == data
    fractions = [
        e["fraction"] for e in progress.events if e["event"] == "progress" and e["stage"] == "download"
    ]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert handler.hits == ["/a.bin"]
    # second time: a cache hit, the server is not contacted even when downloads are allowed
    again = ensure_weights(card, progress=SilentProgress())
    assert again == paths and handler.hits == ["/a.bin"]
    assert weights_present(card)
    assert partial_artifacts(isolated_cache) == []


def test_sha_mismatch_keeps_nothing(server, isolated_cache: Path) -> None:
    base, root, _ = server
    entry = _entry(root, base, "a.bin", b"published bytes")
    (root / "a.bin").write_bytes(b"tampered bytes!")  # same size, other content
    card = _card([entry])
    with pytest.raises(ChecksumMismatch, match="SHA-256"):
        ensure_weights(card)
    assert not (weights_cache_dir(card) / "a.bin").exists()
    assert partial_artifacts(isolated_cache) == []


def test_http_404_names_url_and_weights_dir(server, isolated_cache: Path) -> None:
    base, _, _ = server
    card = _card([{"name": "gone.bin", "url": f"{base}/gone.bin", "sha256": "0" * 64, "size": 4}])
    with pytest.raises(WeightsUnavailable) as info:
        ensure_weights(card)
    message = str(info.value)
    assert "404" in message and f"{base}/gone.bin" in message and "--weights-dir" in message
    assert partial_artifacts(isolated_cache) == []


def test_broken_download_leaves_no_file(server, isolated_cache: Path) -> None:
    base, root, handler = server
    card = _card([_entry(root, base, "big.bin", b"x" * 2_000_000)])
    handler.truncate.add("big.bin")
    with pytest.raises((WeightsUnavailable, ChecksumMismatch)):
        ensure_weights(card, timeout=5)
    assert not (weights_cache_dir(card) / "big.bin").exists()
    assert partial_artifacts(isolated_cache) == []


def test_no_network_message(isolated_cache: Path) -> None:
    # port 9 on 127.0.0.1 ("discard"): nothing listens, the connection is refused
    card = _card([{"name": "w.bin", "url": "http://127.0.0.1:9/w.bin", "sha256": "0" * 64, "size": 1}])
    with pytest.raises(WeightsUnavailable) as info:
        ensure_weights(card, timeout=5)
    assert "http://127.0.0.1:9/w.bin" in str(info.value) and WEIGHTS_ENV in str(info.value)
    with pytest.raises(WeightsUnavailable, match="downloads are off"):
        ensure_weights(card, allow_download=False)


def test_mirror_layouts_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"weights!"
    entry = {
        "name": "m.bin",
        "url": "http://127.0.0.1:9/models/folder_x/m.bin",  # never contacted: mirrors win
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    card = _card([entry], "mirror-model")
    for layout in ("m.bin", "mirror-model/m.bin", "folder_x/m.bin"):
        mirror = tmp_path / layout.replace("/", "_")
        (mirror / layout).parent.mkdir(parents=True, exist_ok=True)
        (mirror / layout).write_bytes(data)
        assert ensure_weights(card, weights_dir=mirror, allow_download=False)["m.bin"] == mirror / layout
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "m.bin"))
    assert locate_weights(card)["m.bin"] == tmp_path / "m.bin" / "m.bin"
    # a mirror copy with the wrong content is never used, and never silently replaced by a download
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "m.bin").write_bytes(b"WEIGHTS!")
    with pytest.raises(ChecksumMismatch) as info:
        ensure_weights(card, weights_dir=bad, timeout=5)
    message = str(info.value)
    assert str(bad / "m.bin") in message and "SHA-256" in message and entry["url"] in message
    assert "--weights-dir" in message and "not replaced by a download" in message
    # a good copy in another mirror folder still wins over the bad one
    assert (
        ensure_weights(card, weights_dir=[bad, tmp_path / "m.bin"])["m.bin"] == tmp_path / "m.bin" / "m.bin"
    )


def test_corrupt_cache_copy_is_downloaded_again(server, isolated_cache: Path) -> None:
    base, root, handler = server
    data = b"published weights"
    card = _card([_entry(root, base, "a.bin", data)])
    cached = ensure_weights(card)["a.bin"]
    cached.write_bytes(b"PUBLISHED WEIGHTS")  # same size, flipped bits
    progress = SilentProgress()
    assert ensure_weights(card, progress=progress)["a.bin"].read_bytes() == data
    assert handler.hits == ["/a.bin", "/a.bin"]
    assert any("ignoring" in e.get("message", "") and str(cached) in e["message"] for e in progress.events)


def test_offline_env_forbids_downloads(server, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, root, handler = server
    card = _card([_entry(root, base, "a.bin", b"published weights")])
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsUnavailable) as info:
        ensure_weights(card)  # downloads allowed by the caller, forbidden by the user
    message = str(info.value)
    assert f"{OFFLINE_ENV}=1" in message and f"{base}/a.bin" in message and "--weights-dir" in message
    assert handler.hits == [] and not weights_present(card)
    monkeypatch.setenv(OFFLINE_ENV, "0")
    assert ensure_weights(card)["a.bin"].read_bytes() == b"published weights"


def test_archive_member_download_and_mirror(server, tmp_path: Path, isolated_cache: Path) -> None:
    base, root, handler = server
    payload = b"torchscript bytes" * 100
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/model.pt", payload)
    entry = _entry(root, base, wheel.name, wheel.read_bytes())
    entry.update(
        name="model.pt", member="pkg/data/model.pt", member_sha256=hashlib.sha256(payload).hexdigest()
    )
    card = _card([entry], "wheel-model")
    path = ensure_weights(card)["model.pt"]
    assert path.read_bytes() == payload and handler.hits == [f"/{wheel.name}"]
    # a mirror holding only the wheel works offline, in a fresh cache
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / wheel.name).write_bytes(wheel.read_bytes())
    for cached in weights_cache_dir(card).iterdir():
        cached.unlink()
    path = ensure_weights(card, weights_dir=mirror, allow_download=False)["model.pt"]
    assert path.read_bytes() == payload and len(handler.hits) == 1
    assert partial_artifacts(isolated_cache) == []
