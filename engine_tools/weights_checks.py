"""What a weights file must be before it is used: its pins (SHA-256, else MD5) and its file format.

Publishers pin files differently: MONAI's model zoo gives only MD5, Dropbox and Google Drive links give
nothing. A pinned file is checked against its pin. An unpinned file is at least checked to be the
kind of file its name promises: a share page saved instead of the file (HTML), or a zip archive where
a pickle checkpoint is expected, is refused with a message saying what was found.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

_MEMO: dict[tuple[str, str, int, int], str] = {}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80
#: File-name endings and what their content must start with (None: only "not HTML").
_CHECKPOINT_ENDINGS = (".pt", ".pth", ".model", ".ckpt", ".tar")
_ZIP_ENDINGS = (".zip", ".whl")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest (``"sha256"`` or ``"md5"``) of ``path``, memoised per (path, size, mtime)."""
    stat = path.stat()
    key = (algorithm, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MEMO:
        digest = hashlib.new(algorithm)
        with open(path, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
        _MEMO[key] = digest.hexdigest()
    return _MEMO[key]


def pin_problem(path: Path, sha256: str | None, md5: str | None, size: int | None) -> str | None:
    """Why ``path`` does not match its pins (size, then SHA-256, else MD5), or ``None``."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != int(size):
        return f"size {actual_size} bytes, card says {size}"
    if sha256:
        actual = file_digest(path, "sha256")
        return None if actual.lower() == str(sha256).lower() else f"SHA-256 {actual}, card says {sha256}"
    if md5:
        actual = file_digest(path, "md5")
        return None if actual.lower() == str(md5).lower() else f"MD5 {actual}, the publisher's is {md5}"
    return None


def head_problem(head: bytes, name: str) -> str | None:
    """Why the first bytes ``head`` of a file called ``name`` are not that kind of file, or ``None``."""
    stripped = head.lstrip()[:64].lower()
    lower = name.lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")) and not lower.endswith(".html"):
        return "an HTML page (a download or sign-in page saved instead of the file?)"
    if lower.endswith(_CHECKPOINT_ENDINGS):
        if not (head.startswith(_ZIP_MAGIC) or (head[:1] and head[0] == _PICKLE_PROTOCOL)):
            return "neither a PyTorch zip checkpoint nor a pickle"
    elif lower.endswith(_ZIP_ENDINGS) and not head.startswith(_ZIP_MAGIC):
        return "not a zip archive"
    elif lower.endswith(".pkl") and not (head[:1] and head[0] == _PICKLE_PROTOCOL):
        return "not a pickle"
    elif lower.endswith(".json") and not stripped.startswith((b"{", b"[")):
        return "not JSON"
    return None


def format_problem(path: Path, name: str) -> str | None:
    """:func:`head_problem` plus, for a zip where a PyTorch checkpoint is expected, a look inside."""
    with open(path, "rb") as stream:
        head = stream.read(512)
    problem = head_problem(head, name)
    if problem or not (name.lower().endswith(_CHECKPOINT_ENDINGS) and head.startswith(_ZIP_MAGIC)):
        return problem
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except zipfile.BadZipFile as exc:
        return f"a damaged zip file ({exc})"
    if not any(member.endswith("data.pkl") for member in members):
        bundle = [m for m in members if m.endswith("models/model.pt")]
        hint = f" (it holds {bundle[0]}: a MONAI bundle archive?)" if bundle else ""
        return f"a zip archive that is not a PyTorch checkpoint{hint}"
    return None
