"""NumPy's transparent-huge-page advice is turned off exactly where the kernel would compact memory
synchronously on first touch (engine_tools.machine.avoid_hugepage_compaction_stalls)."""

from __future__ import annotations

import numpy as np

from engine_tools.machine import avoid_hugepage_compaction_stalls, transparent_hugepage_defrag


def test_advice_follows_the_kernel_setting() -> None:
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    previous = multiarray._set_madvise_hugepage(True)
    try:
        turned_off = avoid_hugepage_compaction_stalls()
        assert turned_off == (transparent_hugepage_defrag() in ("madvise", "always"))
        assert multiarray._set_madvise_hugepage(True) is (not turned_off)  # returns the state it found
    finally:
        multiarray._set_madvise_hugepage(previous)


def test_defrag_setting_is_read_from_the_kernel() -> None:
    setting = transparent_hugepage_defrag()
    assert setting is None or setting in ("always", "defer", "defer+madvise", "madvise", "never")
