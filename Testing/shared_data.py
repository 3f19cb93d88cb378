"""Paths to the real data and weights in ``../shared`` (importable by tests as ``shared_data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDQUANT_SHARED", REPO.parent / "shared"))
ARTIFACTS = REPO / "Testing" / "artifacts"


def shared_path(*parts: str) -> Path:
    """A file under ``../shared``; the test is skipped (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not present (see ../shared/README.md)")
    return path
