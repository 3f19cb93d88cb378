"""Shared pytest fixtures: the real data in ``../shared`` and an isolated cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import ARTIFACTS, SHARED


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present: real data and weights live in ../shared")
    return SHARED


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ``$MEDQUANT_CACHE_DIR`` unless it shares the session cache explicitly."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache shared by the tests of one run (for expensive engine builds reused across tests)."""
    return tmp_path_factory.mktemp("session-cache")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests save artifacts a person may look at (screenshots, reports)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
