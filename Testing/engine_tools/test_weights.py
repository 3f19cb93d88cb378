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
    WeightsError,
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


# ------------------------------------------------------------------------ checksums and formats
def test_md5_only_entry_is_checked_and_sha256_recorded(server, isolated_cache: Path) -> None:
    """MONAI's model zoo publishes MD5 only: it is checked, and the SHA-256 is recorded for later."""
    import torch

    base, root, handler = server
    torch.save({"w": torch.ones(3)}, root / "model_zoo.pt")
    data = (root / "model_zoo.pt").read_bytes()
    entry = {"name": "model.pt", "url": f"{base}/model_zoo.pt", "md5": hashlib.md5(data).hexdigest()}
    with pytest.raises(ChecksumMismatch, match="MD5"):
        ensure_weights(_card([{**entry, "md5": "0" * 32}], "md5-model"), timeout=5)
    assert not list(weights_cache_dir(_card([entry], "md5-model")).glob("model.pt*"))

    progress = SilentProgress()
    path = ensure_weights(_card([entry], "md5-model"), progress=progress, timeout=5)["model.pt"]
    assert path.read_bytes() == data
    recorded = path.with_name("model.pt.sha256").read_text().strip()
    assert recorded == hashlib.sha256(data).hexdigest()
    assert any(recorded in event.get("message", "") for event in progress.events)


def test_unpinned_download_is_recorded_and_checked_later(server, isolated_cache: Path) -> None:
    base, root, handler = server
    (root / "w.onnx").write_bytes(b"\x08\x07onnx-ish")
    card = _card([{"name": "w.onnx", "url": f"{base}/w.onnx", "sha256": None}], "unpinned")
    cached = ensure_weights(card, timeout=5)["w.onnx"]
    assert (
        cached.with_name("w.onnx.sha256").read_text().strip()
        == hashlib.sha256(b"\x08\x07onnx-ish").hexdigest()
    )
    cached.write_bytes(b"\x08\x07ONNX-ISH")  # changed after the download: no longer what was recorded
    assert ensure_weights(card, timeout=5)["w.onnx"].read_bytes() == b"\x08\x07onnx-ish"
    assert handler.hits == ["/w.onnx", "/w.onnx"]


def test_unpinned_file_of_the_wrong_kind_is_refused(server, tmp_path: Path, isolated_cache: Path) -> None:
    """A share page saved as the file, or a MONAI bundle zip named like its checkpoint, is not used."""
    import torch

    base, root, handler = server
    (root / "view").write_text("<!DOCTYPE html><html><head><title>Google Drive</title></head></html>")
    card = _card([{"name": "base_ep4k.model", "url": f"{base}/view"}], "drive-page")
    with pytest.raises(ChecksumMismatch, match="HTML page"):
        ensure_weights(card, timeout=5)
    assert not (weights_cache_dir(card) / "base_ep4k.model").exists()

    mirror = tmp_path / "mirror" / "bundle-model"
    mirror.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, tmp_path / "inner.pt")
    with zipfile.ZipFile(mirror / "model.pt", "w") as zf:
        zf.write(tmp_path / "inner.pt", "swin_unetr_btcv_segmentation/models/model.pt")
    card = _card([{"name": "model.pt", "url": f"{base}/model.pt"}], "bundle-model")
    with pytest.raises(ChecksumMismatch, match="not a PyTorch checkpoint.*MONAI bundle"):
        ensure_weights(card, weights_dir=mirror.parent, allow_download=False)


def test_bundle_zip_in_the_mirror_gives_its_model_pt(tmp_path: Path, isolated_cache: Path) -> None:
    import torch

    bundle = "swin_unetr_btcv_segmentation"
    torch.save({"w": torch.arange(4.0)}, tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    mirror = tmp_path / "mirror"
    (mirror / "bundle-card").mkdir(parents=True)
    with zipfile.ZipFile(mirror / "bundle-card" / f"{bundle}_v0.5.6.zip", "w") as zf:
        zf.writestr(f"{bundle}/configs/inference.json", "{}")
        zf.write(tmp_path / "model.pt", f"{bundle}/models/model.pt")
    entry = {"name": "model.pt", "url": "http://127.0.0.1:9/model_zoo/x.pt", "bundle": bundle}
    card = _card([{**entry, "md5": hashlib.md5(data).hexdigest()}], "bundle-card")
    assert ensure_weights(card, weights_dir=mirror, allow_download=False)["model.pt"].read_bytes() == data
    wrong = _card([{**entry, "md5": "f" * 32}], "bundle-card-2")
    (mirror / "bundle-card" / f"{bundle}_v0.5.6.zip").rename(mirror / f"{bundle}_v0.5.6.zip")
    with pytest.raises(ChecksumMismatch, match="MD5"):
        ensure_weights(wrong, weights_dir=mirror, allow_download=False)


def test_flat_mirror_name_shared_by_several_cards_is_ambiguous(tmp_path: Path, isolated_cache: Path) -> None:
    """Four MONAI cards name their file model.pt: DIR/model.pt is not taken for any of them."""
    import torch

    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    card = _card([{"name": "model.pt", "url": "http://127.0.0.1:9/other/model.pt"}], "my-model")
    with pytest.raises(WeightsError, match=r"several models.*my-model/model\.pt"):
        ensure_weights(card, weights_dir=tmp_path, allow_download=False)
    (tmp_path / "my-model").mkdir()
    (tmp_path / "model.pt").rename(tmp_path / "my-model" / "model.pt")
    assert (
        ensure_weights(card, weights_dir=tmp_path, allow_download=False)["model.pt"]
        == tmp_path / "my-model" / "model.pt"
    )
