"""The guard's strict-FP32 reference is cached on disk and reused by a rebuild on the same samples;
a changed cache file or a changed sample is detected and the reference computed again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_tools import reference_cache
from engine_tools.guard import AccuracyGuard
from engine_tools.progress import SilentProgress

torch = pytest.importorskip("torch")
pytest.importorskip("nncf")


def _onnx(path: Path) -> Path:
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(6, 3, 1)
    ).eval()
    torch.onnx.export(
        network,
        torch.zeros(1, 1, 12, 12, 12),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamo=False,
    )
    return path


def _volumes(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, size=(1, *shape)).astype(np.float32) for shape in ((14, 12, 10), (12, 16, 12))]


def _build(onnx_path: Path, validation: list[np.ndarray]) -> tuple[object, int]:
    """One measured INT8 build (real NNCF + OpenVINO); returns its report and its FP32 passes."""
    from openvino import Core

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    fp32_passes = []

    class Counting(NNCFAdapter):
        def run_digests(self, candidate, samples, timings=None):  # noqa: ANN001, ANN202
            if candidate is None:
                fp32_passes.append(len(samples))
            return super().run_digests(candidate, samples, timings=timings)

    options = {"guard": False, "int8_fallback": "f32", "reference_network": "tiny net v1"}
    adapter = Counting(Core().read_model(str(onnx_path)), _volumes(0), options, validation)
    _, report = AccuracyGuard(adapter, validation, _volumes(0), options, SilentProgress()).run()
    return report, sum(fp32_passes)


def test_reference_is_reused_and_a_corrupted_file_is_recomputed(tmp_path: Path) -> None:
    onnx_path = _onnx(tmp_path / "tiny.onnx")
    validation = _volumes(1)
    first, passes = _build(onnx_path, validation)
    assert first.reference_fp32 == "computed" and passes == len(validation)
    again, passes = _build(onnx_path, validation)
    assert again.reference_fp32 == "cache" and passes == 0
    assert again.final_mean_dice == first.final_mean_dice and again.sqnr_db == first.sqnr_db
    assert again.latency["fp32_strict_median_s"] == first.latency["fp32_strict_median_s"]

    path = reference_cache.reference_path(reference_cache.reference_key("tiny net v1", validation))
    stored = path / "sampled-0001.npy"
    data = bytearray(stored.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # one logit changed (NaN) after it was stored
    stored.write_bytes(bytes(data))
    assert reference_cache.load(path) is None
    repaired, passes = _build(onnx_path, validation)
    assert repaired.reference_fp32 == "computed" and passes == len(validation)
    assert repaired.final_mean_dice == first.final_mean_dice and reference_cache.load(path) is not None

    changed = [v.copy() for v in validation]
    changed[0][0, 0, 0, 0] += 0.5  # another scan or preprocessing: another key
    other, passes = _build(onnx_path, changed)
    assert other.reference_fp32 == "computed" and passes == len(validation)


def test_large_references_are_stored_only_when_their_pass_was_slower_than_the_round_trip() -> None:
    from engine_tools.accuracy import digest
    from engine_tools.reference_cache import (
        LARGE_BYTES,
        ROUND_TRIP_BYTES_PER_S,
        CachedReference,
        worth_storing,
    )

    small = CachedReference([digest(np.zeros((1, 2, 8, 8, 8), np.float32))], [0.001])
    large = digest(np.zeros((1, 2, 8, 8, 8), np.float32))
    large.sampled = np.zeros(LARGE_BYTES // 4 + 1024, np.float32)
    round_trip_s = (large.sampled.nbytes + large.labels.nbytes) / ROUND_TRIP_BYTES_PER_S
    assert worth_storing(small)
    assert not worth_storing(CachedReference([large], [0.5 * round_trip_s]))
    assert worth_storing(CachedReference([large], [2.0 * round_trip_s]))


def test_a_whole_volume_reference_is_a_digest_small_enough_to_store() -> None:
    """104 classes over a 96^3 crop: 368 MB of logits become 0.9 MB of labels and at most 64 MiB of
    logits on a sub-grid; Dice from the digests equals Dice from the logits, SQNR is close."""
    from engine_tools.accuracy import SQNR_SAMPLE_BYTES, digest_agreement, digests, logits_agreement
    from engine_tools.reference_cache import CachedReference, worth_storing

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(1, 104, 96, 96, 96)).astype(np.float32)
    test = reference + rng.normal(scale=0.3, size=reference.shape).astype(np.float32)
    ref_digest, test_digest = digests([reference]), digests([test])
    assert ref_digest[0].labels.dtype == np.uint8 and ref_digest[0].stride == 2
    assert ref_digest[0].sampled.nbytes <= SQNR_SAMPLE_BYTES
    assert worth_storing(CachedReference(ref_digest, [0.0]))
    exact = logits_agreement([reference], [test])
    found = digest_agreement(ref_digest, test_digest)
    assert found["per_label"] == exact["per_label"] and found["mean"] == exact["mean"]
    assert found["sqnr_db"] == pytest.approx(exact["sqnr_db"], abs=0.05) and found["sqnr_stride"] == 2
