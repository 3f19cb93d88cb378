"""Where a card's weight files may lie in a mirror: parts of their URLs, and which relative mirror
paths name different files of different cards (``model.pt`` of four MONAI cards), so that a copy
found there cannot be attributed to one card without a checksum.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from engine_tools.registry import CardError, ModelCard, load_cards


def url_folder(url: str | None) -> str | None:
    if not url:
        return None
    parts = [p for p in urllib.parse.urlparse(url).path.split("/") if p]
    return urllib.parse.unquote(parts[-2]) if len(parts) >= 2 else None


def url_filename(url: str | None) -> str | None:
    if not url:
        return None
    parts = [p for p in urllib.parse.urlparse(url).path.split("/") if p]
    return urllib.parse.unquote(parts[-1]) if parts else None


def layout_owners() -> dict[str, set[str]]:
    """Relative mirror paths (``name``, ``URL folder/name``) → the URLs of every card's files there."""
    owners: dict[str, set[str]] = {}
    try:
        cards = load_cards()
    except CardError:
        return owners
    for other in cards.values():
        for entry in other.weights.get("files") or []:
            if not isinstance(entry, dict) or not entry.get("name"):
                continue
            places = [(entry["name"], file_identity(other, entry))]
            if entry.get("member") and url_filename(entry.get("url")):
                places.append((url_filename(entry.get("url")), str(entry["url"])))  # the archive itself
            folder = url_folder(entry.get("url"))
            for name, identity in places:
                for relative in (name, f"{folder}/{name}" if folder else None):
                    if relative:
                        owners.setdefault(relative, set()).add(identity)
    return owners


def file_identity(card: ModelCard, entry: dict[str, Any]) -> str:
    """What makes two entries the same file: URL and archive member (cards may share an archive)."""
    source = str(entry.get("url") or entry.get("path") or f"{card.id}/{entry['name']}")
    return f"{source}#{entry['member']}" if entry.get("member") else source
