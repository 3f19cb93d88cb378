"""Cache locations, content hashes and atomic writes.

Everything the tools persist (downloaded weights, exported ONNX, calibration sets, built engines) goes
through :func:`atomic_file` or :func:`atomic_directory`: the content is written under a temporary name
beside its destination and renamed into place only when complete, so a killed process never leaves a
half-written artifact that a later run could mistake for a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_ENV = "MEDQUANT_CACHE_DIR"
TMP_PREFIX = ".partial-"


def cache_root() -> Path:
    """Per-user cache directory (``$MEDQUANT_CACHE_DIR``, else the platform's user cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "medquant"


def cache_dir(kind: str) -> Path:
    """A sub-directory of the cache for one kind of artifact (``weights``, ``engines``, ...)."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Stable hash of a JSON-serialisable value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def atomic_file(destination: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``destination``; rename it into place only on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + destination.name + ".", dir=destination.parent)
    try:
        with os.fdopen(fd, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, destination)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``destination`` only if the block succeeds."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + destination.name + ".", dir=destination.parent))
    try:
        yield tmp
        if destination.exists():
            old = destination.with_name(TMP_PREFIX + destination.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, value: Any) -> None:
    with atomic_file(path, "w") as stream:
        json.dump(value, stream, indent=2, sort_keys=True, default=str)


def partial_artifacts(root: str | Path) -> list[Path]:
    """Leftovers of interrupted writes under ``root`` (should be empty after any clean run or cancel)."""
    return sorted(Path(root).rglob(TMP_PREFIX + "*"))
