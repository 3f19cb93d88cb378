"""Paths to the real data and weights in ``../shared`` (importable by tests as ``shared_data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine_tools.cache import cache_root

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDQUANT_SHARED", REPO.parent / "shared"))
ARTIFACTS = REPO / "Testing" / "artifacts"
# The user cache as the install step left it (`medquant fetch` of the wheel-shipped weights), read before
# the per-test cache isolation of conftest.py changes $MEDQUANT_CACHE_DIR.
INSTALLED_CACHE = cache_root()


def shared_path(*parts: str) -> Path:
    """A file under ``../shared``; the test is skipped (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not present (see ../shared/README.md)")
    return path


def installed_weights_cache() -> Path:
    """The cache folder that the install step fetched package-shipped weights into."""
    return INSTALLED_CACHE


def require_installed(what: str, instruction: str) -> None:
    """Fail under CI (the install step must provide ``what``); elsewhere skip with the instruction."""
    message = f"{what} not installed: {instruction}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI runs the install step, so this is a failure there)")
    pytest.skip(message)
