"""TensorRT build decisions that need no TensorRT: optimization profile, workspace, timing cache
(driven through a stand-in for the documented ``IBuilderConfig``/``ITimingCache`` calls), and the
inspector call order (driven through a stand-in ``ICudaEngine``/``IExecutionContext``)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from engine_tools.engines.tensorrt.builder import (
    GIB,
    attach_timing_cache,
    profile_shapes,
    save_timing_cache,
    timing_cache_path,
    workspace_bytes,
)
from engine_tools.engines.tensorrt.meta import layer_precisions
from engine_tools.engines.tensorrt.runner import engine_information

DATA = Path(__file__).parent / "data" / "tensorrt"


def test_dynamic_batch_profile() -> None:
    shapes = profile_shapes((-1, 1, -1, -1, -1), 1, (64, 64, 64), 4)
    assert shapes.min == (1, 1, 64, 64, 64) and shapes.opt == shapes.max == (4, 1, 64, 64, 64)
    assert shapes.batch == 4 and not shapes.static_batch and shapes.needs_profile and not shapes.note


def test_static_batch_is_kept_and_said() -> None:
    shapes = profile_shapes((2, 1, 96, 96, 96), 1, (96, 96, 96), 4)
    assert shapes.min == shapes.opt == shapes.max == (2, 1, 96, 96, 96)
    assert shapes.batch == 2 and shapes.static_batch and not shapes.needs_profile
    assert "fixes the batch at 2" in shapes.note
    dynamic_window = profile_shapes((1, 1, -1, -1, -1), 1, (32, 32, 32), 1)
    assert (
        dynamic_window.needs_profile and dynamic_window.min == (1, 1, 32, 32, 32) and not dynamic_window.note
    )


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((-1, 3, 96, 96, 96), "fixes channels at 3 but the model card asks for 1"),
        ((-1, 1, 96, 128, 96), "fixes spatial dimension 1 at 128 but the model card asks for 96"),
        ((-1, 1, 96, 96), "must be 5-D"),
    ],
)
def test_static_dims_that_contradict_the_card_are_refused(shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        profile_shapes(shape, 1, (96, 96, 96), 2)


def test_workspace_defaults_to_device_memory_minus_margin() -> None:
    assert workspace_bytes(141 * GIB) == int(141 * GIB - 14.1 * GIB)
    assert workspace_bytes(16 * GIB) == 14 * GIB  # margin is at least 2 GiB
    assert workspace_bytes(16 * GIB, margin_gib=4) == 12 * GIB
    assert workspace_bytes(141 * GIB, workspace_gib=8) == 8 * GIB
    with pytest.raises(ValueError, match="leaves no workspace"):
        workspace_bytes(1 * GIB)


def test_timing_cache_file_per_version_and_architecture(tmp_path: Path) -> None:
    h100 = timing_cache_path("10.13.3.9", "9.0", tmp_path)
    assert h100.name == "timing-trt10.13.3.9-sm90.cache"
    assert timing_cache_path("10.13.3.9", "8.9", tmp_path) != h100
    assert timing_cache_path("11.0.0.7", "9.0", tmp_path) != h100


class FakeTimingCache:
    """``ITimingCache``: ``serialize()`` and ``combine(other, ignore_mismatch) -> bool``."""

    def __init__(self, entries: set[str], arch: str) -> None:
        self.entries, self.arch = set(entries), arch

    def serialize(self) -> bytes:
        return json.dumps({"arch": self.arch, "entries": sorted(self.entries)}).encode()

    def combine(self, other: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if other.arch != self.arch and not ignore_mismatch:
            return False
        time.sleep(0.05)  # widen the read-merge-write window that the file lock must protect
        self.entries |= other.entries
        return True


class FakeBuilderConfig:
    """``IBuilderConfig``'s timing-cache calls, as their documentation states them: ``create_timing_cache``
    may return ``None`` (unreadable bytes), ``set_timing_cache`` returns False on a mismatched cache,
    ``get_timing_cache`` returns ``None`` when none is set."""

    def __init__(self, arch: str = "sm90", tactics: set[str] | None = None) -> None:
        self.arch, self.tactics, self.cache = arch, tactics or set(), None

    def create_timing_cache(self, data: bytes) -> FakeTimingCache | None:
        if not data:
            return FakeTimingCache(set(), self.arch)
        try:
            stored = json.loads(data)
        except ValueError:
            return None
        return FakeTimingCache(set(stored["entries"]), stored["arch"])

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.arch != self.arch and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        if self.cache is not None:
            self.cache.entries |= self.tactics  # what the build timed
        return self.cache


def test_timing_cache_reuse_is_reported_only_when_accepted(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    first = FakeBuilderConfig(tactics={"conv-a"})
    assert attach_timing_cache(first, path)["timing_cache_reused"] is False
    assert save_timing_cache(first, path)
    second = FakeBuilderConfig(tactics={"conv-b"})
    assert attach_timing_cache(second, path)["timing_cache_reused"] is True
    # a cache TensorRT refuses (other architecture, or corrupt bytes) is not claimed as reused
    for refused in (FakeBuilderConfig(arch="sm89"), None):
        if refused is None:
            path.write_bytes(b"corrupt")
            refused = FakeBuilderConfig()
        log = attach_timing_cache(refused, path)
        assert log["timing_cache_reused"] is False and "refused" in log["timing_cache_note"]
        assert refused.cache is not None and refused.cache.entries == set()


def test_no_timing_cache_is_not_written(tmp_path: Path) -> None:
    assert save_timing_cache(FakeBuilderConfig(), tmp_path / "timing.cache") is False
    assert not (tmp_path / "timing.cache").exists()


def test_concurrent_builders_merge_their_timings(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    builders = [FakeBuilderConfig(tactics={f"conv-{i}"}) for i in range(4)]
    for builder in builders:
        attach_timing_cache(builder, path)
    path.write_bytes(FakeTimingCache({"older"}, "sm90").serialize())
    threads = [threading.Thread(target=save_timing_cache, args=(b, path)) for b in builders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(json.loads(path.read_bytes())["entries"]) == {"older", "conv-0", "conv-1", "conv-2", "conv-3"}


class FakeInspector:
    """``IEngineInspector``: formats are resolved only with an execution context whose shape is set."""

    def __init__(self) -> None:
        self.execution_context: FakeContext | None = None

    def get_engine_information(self, fmt: str) -> str:
        assert fmt == "JSON"
        resolved = self.execution_context is not None and self.execution_context.shape is not None
        name = "inspector_unet_int8.json" if resolved else "inspector_unet_int8_dynamic.json"
        return (DATA / name).read_text(encoding="utf-8")


class FakeContext:
    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = shape
        return name == "input" and -1 not in shape


class FakeEngine:
    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, 1, 96, 96, 96)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 1, 96, 96, 96), (2, 1, 96, 96, 96), (2, 1, 96, 96, 96)]

    def create_engine_inspector(self) -> FakeInspector:
        return FakeInspector()


def test_inspector_reads_precisions_with_an_execution_context() -> None:
    context = FakeContext()
    layers = layer_precisions(engine_information(FakeEngine(), context, "input", "JSON"))
    assert context.shape == (2, 1, 96, 96, 96)
    assert [layer["precision"] for layer in layers] == ["int8", "fp16", "fp16", "unknown"]
