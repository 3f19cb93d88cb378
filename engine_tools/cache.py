"""Cache locations, content hashes, atomic writes, per-key locks and clean-up of interrupted writes.

Everything the tools persist (downloaded weights, exported ONNX, calibration sets, built engines) goes
through :func:`atomic_file` or :func:`atomic_directory`: the content is written under a temporary name
beside its destination and renamed into place only when complete, so a killed process never leaves a
half-written artifact that a later run could mistake for a good one. Temporary names carry the
writer's process id (``.partial-<name>.<pid>.<random>``): :func:`remove_stale_partials` deletes those
whose process is gone or that are older than a day. Artifacts record the SHA-256 of their files
(:func:`file_hashes`) and are checked before reuse (:func:`hash_problem`); :func:`key_lock` serialises
builds of one cache key across processes (``filelock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_ENV = "MEDQUANT_CACHE_DIR"
TMP_PREFIX = ".partial-"
#: Interrupted writes older than this are removed even if their process id is in use again.
STALE_AFTER_S = 24 * 3600
_OWNER = re.compile(r"\.(\d+)\.[^.]+$")


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
    fd, tmp_name = tempfile.mkstemp(prefix=_partial_prefix(destination), dir=destination.parent)
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
    """Yield a temporary directory that replaces ``destination`` only if the block succeeds.

    An existing ``destination`` is first moved aside under a unique temporary name, so two writers of
    one destination never fail each other's final rename (the last one wins; use :func:`key_lock` to
    avoid the duplicated work).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(destination), dir=destination.parent))
    try:
        yield tmp
        for _attempt in range(5):
            try:
                os.replace(tmp, destination)  # succeeds when destination is absent or an empty folder
                break
            except OSError:
                old = Path(tempfile.mkdtemp(prefix=_partial_prefix(destination), dir=destination.parent))
                try:
                    os.replace(destination, old / "old")
                except FileNotFoundError:
                    pass
                shutil.rmtree(old, ignore_errors=True)
        else:
            raise OSError(f"{destination}: could not move the finished result into place")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, value: Any) -> None:
    with atomic_file(path, "w") as stream:
        json.dump(value, stream, indent=2, sort_keys=True, default=str)


def partial_artifacts(root: str | Path) -> list[Path]:
    """Leftovers of interrupted writes under ``root`` (should be empty after any clean run or cancel).

    Other processes rename and remove their temporary folders while this walks, so a folder that
    vanishes mid-walk is skipped (``os.walk`` ignores it) rather than failing the caller, and the walk
    does not descend into temporary folders: their contents go with them.
    """
    found = []
    for folder, subfolders, files in os.walk(root):
        partial = [name for name in subfolders if name.startswith(TMP_PREFIX)]
        subfolders[:] = [name for name in subfolders if not name.startswith(TMP_PREFIX)]
        found += [Path(folder, name) for name in partial + files if name.startswith(TMP_PREFIX)]
    return sorted(found)


def _partial_prefix(destination: Path) -> str:
    return f"{TMP_PREFIX}{destination.name}.{os.getpid()}."


def _owner_alive(name: str) -> bool:
    match = _OWNER.search(name)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_partials(root: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove interrupted writes under ``root`` whose process is gone or that are older than
    ``max_age_s``; returns what was removed (writes of running processes are left alone)."""
    removed = []
    now = time.time()
    for path in partial_artifacts(root):
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue
        if _owner_alive(path.name) and age < max_age_s:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def file_hashes(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative POSIX path → hex digest), except ``exclude``."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() not in exclude
    }


def hash_problem(folder: str | Path, recorded: Any, exclude: tuple[str, ...] = ()) -> str | None:
    """Why the files under ``folder`` differ from ``recorded`` (as made by :func:`file_hashes`), or None."""
    if not isinstance(recorded, dict) or not recorded:
        return "no SHA-256 of its files was recorded"
    current = file_hashes(folder, exclude)
    missing = sorted(set(recorded) - set(current))
    if missing:
        return f"file(s) missing: {', '.join(missing)}"
    changed = sorted(name for name, digest in recorded.items() if current[name] != digest)
    if changed:
        return f"file(s) changed since the build (SHA-256 differs): {', '.join(changed)}"
    extra = sorted(set(current) - set(recorded))
    if extra:
        return f"unexpected file(s): {', '.join(extra)}"
    return None


def key_lock(destination: str | Path) -> Any:
    """An inter-process lock (``filelock.FileLock``) for one cache entry: one builder per key. The lock
    file lives in ``<cache>/locks`` so that artifact folders hold only artifacts."""
    from filelock import FileLock

    destination = Path(destination)
    return FileLock(str(cache_dir("locks") / f"{destination.parent.name}-{destination.name}.lock"))
