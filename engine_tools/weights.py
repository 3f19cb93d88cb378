"""Model weights: offline mirror, per-user cache, verified downloads.

:func:`ensure_weights` returns the local path of every file a model card lists under
``weights.files``. For each file it looks, in order, at

1. a file the card points to directly (``"path"``: bring-your-own models, pinned by SHA-256);
2. the offline mirror(s): ``weights_dir`` or ``$MEDQUANT_WEIGHTS_DIR`` (``os.pathsep``-separated),
   as ``DIR/<card id>/<name>``, or ``DIR/<name>`` / ``DIR/<folder of the URL>/<name>`` (so a copy
   of a publisher's folder tree works as is, e.g. ``shared/models/brainchop/model18cls/model.bin``)
   when no other card names a different file at that place (four MONAI cards call their file
   ``model.pt``: theirs are only found per card);
3. the cache ``<cache>/weights/<card id>/<name>``;
4. a download from the card's URL (only when ``allow_download`` and ``$MEDQUANT_OFFLINE`` is not
   set): streamed with progress into a temporary file beside its destination, checked against the
   card's size and SHA-256 (or the publisher's MD5 where only that is published), and renamed into
   the cache only when they match. A mismatch or an interrupted download leaves nothing behind. The
   SHA-256 of a file downloaded without one is recorded beside it (``<name>.sha256``) and checks the
   cached copy from then on.

A file the card does not pin must at least be the kind of file its name says
(:mod:`engine_tools.weights_checks`): an HTML page, or a zip where a pickle checkpoint is expected,
is refused. A MONAI bundle entry (``"bundle": "<bundle name>"``) may also be found as the bundle's zip
in the mirror (``DIR/<card id>/<bundle name>*.zip``), whose ``<bundle name>/models/model.pt`` is used.

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

from engine_tools.cache import atomic_file, cache_dir
from engine_tools.progress import Progress, SilentProgress
from engine_tools.registry import ModelCard
from engine_tools.weights_checks import format_problem, head_problem, pin_problem
from engine_tools.weights_layout import file_identity, layout_owners, url_filename, url_folder

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


def _matches(path: Path, sha256: str | None, size: int | None, md5: str | None = None) -> tuple[bool, str]:
    """Whether ``path`` has the pinned size and SHA-256 (else MD5); unpinned values are not checked."""
    problem = pin_problem(path, sha256, md5, size)
    return problem is None, problem or ""


def _recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded when ``path`` was downloaded without a published one."""
    record = path.with_name(path.name + ".sha256")
    return record.read_text(encoding="utf-8").strip() or None if record.is_file() else None


def _record_sha256(path: Path, digest: str, card: ModelCard, progress: Progress) -> None:
    with atomic_file(path.with_name(path.name + ".sha256")) as stream:
        stream.write(f"{digest}\n".encode())
    progress.log(f"{card.id}: {path.name} has SHA-256 {digest} (recorded; the card can pin it)")


def _candidates(
    card: ModelCard, entry: dict[str, Any], name: str, dirs: list[Path], pins: tuple[Any, Any, Any]
) -> list[Path]:
    """Mirror copies of ``name``: ``DIR/<card id>/<name>`` first, then the shared layouts where they
    are unambiguous: no other card's different file has the same relative path, or the copy matches
    this entry's checksum (``pins``: SHA-256, MD5, size)."""
    folder = url_folder(entry.get("url"))
    identity = file_identity(card, entry) if name == entry["name"] else str(entry.get("url"))
    owners = layout_owners()
    found: list[Path] = []
    ambiguous: list[Path] = []
    for root in dirs:
        for relative in (f"{card.id}/{name}", name, f"{folder}/{name}" if folder else None):
            path = root / relative if relative else None
            if path is None or path in found or not path.is_file():
                continue
            shared = relative != f"{card.id}/{name}" and owners.get(relative, {identity}) - {identity}
            if shared and not ((pins[0] or pins[1]) and pin_problem(path, pins[0], pins[1], pins[2]) is None):
                ambiguous.append(path)
            else:
                found.append(path)
    if ambiguous and not found:
        raise WeightsError(
            f"{card.id}: {ambiguous[0]} could belong to several models (other cards name a different file "
            f"the same way); put this model's copy at {ambiguous[0].parents[len(Path(name).parts) - 1] / card.id / name}"
        )
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
    pins: dict[str, Any],
    label: str,
    progress: Progress,
    timeout: float,
) -> str:
    """Stream ``url`` into ``destination`` (atomic), verifying ``pins`` (``size``, ``sha256``, ``md5``)
    before the rename, or, without checksums, that the file is what its name says. Returns its SHA-256."""
    sha256, md5, size = pins.get("sha256"), pins.get("md5"), pins.get("size")
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
        digest, md5_digest = hashlib.sha256(), hashlib.md5()  # noqa: S324 - the publisher's checksum
        head = b""
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
                md5_digest.update(block)
                head = head if len(head) >= 512 else (head + block)[:512]
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
            if not sha256 and md5 and md5_digest.hexdigest().lower() != str(md5).lower():
                raise ChecksumMismatch(
                    f"{label} from {url}: MD5 {md5_digest.hexdigest()} does not match the publisher's {md5}; "
                    "the file was not kept"
                )
            problem = None if (sha256 or md5) else head_problem(head, destination.name)
            if problem:
                raise ChecksumMismatch(f"{label} from {url} is {problem}; the file was not kept")
        progress.update("download", 1.0, f"{label}: {received / 1e6:.1f} MB verified")
    return digest.hexdigest()


def _offline_hint(card: ModelCard, entry: dict[str, Any], name: str) -> str:
    archive = url_filename(entry.get("url")) if entry.get("member") else None
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


def _usable(path: Path, name: str, pins: tuple[str | None, str | None, int | None]) -> str | None:
    """Why ``path`` cannot serve as ``name`` (pins: SHA-256, MD5, size), or ``None``."""
    sha, md5, size = pins
    problem = pin_problem(path, sha, md5, size)
    if problem is None and not (sha or md5):
        found = format_problem(path, name)
        problem = f"not pinned by the card and {found}" if found else None
    return problem


def _from_archives(
    card: ModelCard, entry: dict[str, Any], dirs: list[Path], cached: Path, progress: Progress
) -> tuple[Path | None, list[str], list[str]]:
    """The entry's ``member`` (or MONAI bundle ``models/model.pt``) extracted from a local zip.

    Returns the extracted file (or ``None``), the rejected archives, and those of them in a mirror."""
    name, member = entry["name"], entry.get("member")
    pins = (entry.get("member_sha256"), entry.get("member_md5"), entry.get("member_size"))
    archive_name = url_filename(entry.get("url")) if member else None
    archives: list[tuple[Path, str, bool]] = []  # (archive, member, pinned by the entry's url pins)
    if archive_name:
        archive_pins = (entry.get("sha256"), entry.get("md5"), entry.get("size"))
        archives += [(a, member, True) for a in _candidates(card, entry, archive_name, dirs, archive_pins)]
        cached_archive = weights_cache_dir(card) / archive_name
        if cached_archive.is_file():
            archives.append((cached_archive, member, True))
    elif entry.get("bundle"):
        bundle = entry["bundle"]
        pins = (entry.get("sha256"), entry.get("md5"), entry.get("size"))
        for root in dirs:
            for folder in (root / card.id, root):
                archives += [
                    (a, f"{bundle}/models/model.pt", False) for a in sorted(folder.glob(f"{bundle}*.zip"))
                ]
    rejected, mirror_rejected = [], []
    for archive, inner, pinned in archives:
        if pinned:
            sha = entry.get("sha256") or (_recorded_sha256(archive) if not entry.get("md5") else None)
            ok, why = _matches(archive, sha, entry.get("size"), entry.get("md5"))
            if not ok:
                rejected.append(f"{archive} ({why})")
                if archive.parent != weights_cache_dir(card):
                    mirror_rejected.append(f"{archive} ({why})")
                continue
        progress.update("weights", None, f"{card.id}: extracting {inner} from {archive.name}")
        extracted = _extract_member(archive, inner, cached, card)
        problem = _usable(extracted, name, pins)
        if problem:
            extracted.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{card.id}: {inner} extracted from {archive}: {problem}")
        return extracted, rejected, mirror_rejected
    return None, rejected, mirror_rejected


def _local_file(card: ModelCard, entry: dict[str, Any], dirs: list[Path], progress: Progress) -> Path | None:
    """A verified local copy of one entry (extracting an archive member into the cache if needed)."""
    name = entry["name"]
    member = entry.get("member")
    prefix = "member_" if member else ""
    pins = (entry.get(f"{prefix}sha256"), entry.get(f"{prefix}md5"), entry.get(f"{prefix}size"))
    if entry.get("path"):
        path = Path(entry["path"]).expanduser()
        if not path.is_file():
            raise WeightsError(f"{card.path or card.id}: weights file {path} (entry {name!r}) does not exist")
        ok, why = _matches(path, pins[0], pins[2], pins[1])
        if not ok:
            raise ChecksumMismatch(
                f"{path}: {why}. The card pins the file it was created with; re-add the model "
                "(medquant models add) if you changed the file on purpose."
            )
        return path
    cached = weights_cache_dir(card) / name
    rejected: list[str] = []
    mirror_rejected: list[str] = []
    for path in _candidates(card, entry, name, dirs, pins):
        problem = _usable(path, name, pins)
        if problem is None:
            if not (pins[0] or pins[1]):
                progress.warning(
                    f"{card.id}: {path} is not pinned by a checksum in the card; using it unchecked"
                )
            return path
        rejected.append(f"{path} ({problem})")
        mirror_rejected.append(f"{path} ({problem})")
    if cached.is_file():
        recorded = pins if (pins[0] or pins[1]) else (_recorded_sha256(cached), None, pins[2])
        problem = _usable(cached, name, recorded)
        if problem is None:
            return cached
        rejected.append(f"{cached} ({problem})")
    extracted, archive_rejected, archive_mirror_rejected = _from_archives(card, entry, dirs, cached, progress)
    if extracted is not None:
        return extracted
    rejected += archive_rejected
    mirror_rejected += archive_mirror_rejected
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
                target = cache / (url_filename(entry["url"]) or name) if member else cache / name
                pins = {key: entry.get(key) for key in ("sha256", "md5", "size")}
                try:
                    digest = _download(
                        entry["url"], target, pins, f"{card.id}/{target.name}", progress, timeout
                    )
                except WeightsUnavailable as exc:
                    raise WeightsUnavailable(f"{exc}. {_offline_hint(card, entry, name)}") from exc
                if not pins["sha256"]:
                    _record_sha256(target, digest, card, progress)
                local = _local_file(card, entry, dirs, progress) if member else target
                if local is None:  # pragma: no cover - verified just above
                    raise WeightsError(f"{card.id}: {name} could not be prepared from {target}")
            paths[name] = local
            progress.update("weights", 1.0, f"{card.id}: {name} ready")
    return paths
