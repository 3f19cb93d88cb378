"""TensorRT engine: metadata compatibility and inspector parsing (no TensorRT needed), then real builds
where ``tensorrt`` imports and a CUDA GPU is present (skipped elsewhere, with the reason)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine_tools.engines.tensorrt import TensorRTEngine
from engine_tools.engines.tensorrt.meta import (
    META_FILE,
    EngineMeta,
    EngineMismatch,
    check_compatibility,
    layer_precisions,
    mismatches,
    read_meta,
    summarize_layers,
    version_features,
)

DATA = Path(__file__).parent / "data" / "tensorrt"
H100_TRT10 = {
    "tensorrt_version": "10.13.3.9",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
}


def test_stored_engine_accepted_on_the_machine_that_built_it() -> None:
    stored = check_compatibility(DATA / "meta_h100_trt10.json", {**H100_TRT10, "precision": "int8"})
    assert stored["onnx_kind"] == "qdq" and stored["batch"] == 2


@pytest.mark.parametrize(
    ("current", "message"),
    [
        (
            {**H100_TRT10, "tensorrt_version": "11.0.0.7"},
            "built with TensorRT 10.13.3.9, this is TensorRT 11.0.0.7",
        ),
        ({**H100_TRT10, "tensorrt_version": "10.14.1.48"}, "this is TensorRT 10.14.1.48"),
        (
            {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA L40S", "compute_capability": "8.9"},
            "built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is 8.9 (NVIDIA L40S)",
        ),
        (
            {**H100_TRT10, "gpu_name": "NVIDIA H200"},
            "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200",
        ),
        ({**H100_TRT10, "precision": "fp16"}, "precision differs"),
        ({**H100_TRT10, "model_sha256": "ffff"}, "model (ONNX hash) differs"),
        ({**H100_TRT10, "calibration_sha256": "eeee"}, "calibration set differs"),
    ],
)
def test_engine_from_elsewhere_is_refused_with_reason(current: dict, message: str) -> None:
    with pytest.raises(EngineMismatch) as raised:
        check_compatibility(DATA / "meta_h100_trt10.json", current)
    text = str(raised.value)
    assert message in text and "meta_h100_trt10.json" in text and "rebuild=True" in text


def test_broken_metadata_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        EngineMismatch, match=r"meta_truncated.json: engine metadata lacks compute_capability"
    ):
        read_meta(DATA / "meta_truncated.json")
    with pytest.raises(EngineMismatch, match="schema 0 is not 1"):
        read_meta(DATA / "meta_old_schema.json")
    with pytest.raises(EngineMismatch, match="metadata missing"):
        read_meta(tmp_path / META_FILE)
    broken = tmp_path / META_FILE
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(EngineMismatch, match="not valid JSON"):
        read_meta(broken)


def test_meta_round_trip_matches_itself(tmp_path: Path) -> None:
    meta = EngineMeta(
        "11.0.0.7", "NVIDIA H100 80GB HBM3", "9.0", "fp16", "a" * 64, "b" * 64, window=(96, 96, 96)
    )
    path = tmp_path / META_FILE
    path.write_text(json.dumps(meta.to_json()), encoding="utf-8")
    stored = read_meta(path)
    assert mismatches(stored, {**meta.to_json()}) == []
    assert stored["window"] == [96, 96, 96] and stored["strongly_typed"] is True


def test_version_gates() -> None:
    ten, eleven = version_features("10.13.3.9"), version_features("11.0.0.7")
    assert ten["supported"] and ten["needs_strongly_typed_flag"] and ten["has_weak_typing_flags"]
    assert (
        eleven["supported"]
        and not eleven["needs_strongly_typed_flag"]
        and not eleven["has_weak_typing_flags"]
    )
    assert not version_features("8.6.1")["supported"]
    with pytest.raises(ValueError, match="not a TensorRT version"):
        version_features("latest")


def test_inspector_layers_report_int8_and_fp16_transposed_conv() -> None:
    layers = layer_precisions((DATA / "inspector_unet_int8.json").read_text(encoding="utf-8"))
    assert [layer["precision"] for layer in layers] == ["int8", "fp16", "fp16", "unknown"]
    assert layers[2]["output"] == "fp32"
    summary = summarize_layers(layers)
    assert summary["by_precision"] == {"int8": 1, "fp16": 2, "unknown": 1}
    assert summary["transposed_conv_not_int8"] == ["/model/1/submodule/2/conv/ConvTranspose"]
    assert "TensorRT#4668" in summary["warning"]


def test_inspector_without_shapes_is_unresolved_not_a_false_warning() -> None:
    """The form TensorRT writes when the inspector has no execution context and the batch is dynamic."""
    layers = layer_precisions((DATA / "inspector_unet_int8_dynamic.json").read_text(encoding="utf-8"))
    assert [layer["precision"] for layer in layers] == ["unresolved"] * 3 + ["unknown"]
    summary = summarize_layers(layers)
    assert "transposed_conv_not_int8" not in summary and "warning" not in summary
    assert "no execution context" in summary["unresolved_warning"]
    assert summary["by_precision"].get("int8", 0) == 0  # what the GPU test's INT8 assertion checks


def test_availability_gives_a_reason() -> None:
    ok, reason = TensorRTEngine.availability()
    assert isinstance(reason, str) and reason
    if not ok:
        print(f"TensorRT unavailable here: {reason}")
        assert "tensorrt" in reason.lower() or "gpu" in reason.lower()


def test_a_folder_named_tensorrt_is_not_taken_for_the_package(tmp_path, monkeypatch) -> None:
    """A directory called ``tensorrt`` on ``sys.path`` (a checkout, a cache folder) imports as an empty
    namespace package: availability must say so instead of failing on ``__version__``."""
    import sys

    (tmp_path / "tensorrt").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    ok, reason = TensorRTEngine.availability()
    assert not ok and "is not NVIDIA's TensorRT package" in reason
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)


# -- real TensorRT (GPU machines only) -----------------------------------------------------------------
trt_ok, trt_reason = TensorRTEngine.availability()
needs_trt = pytest.mark.skipif(not trt_ok, reason=f"TensorRT engine not runnable here: {trt_reason}")


@pytest.fixture(scope="module")
def meshnet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A network with a real task: the pretrained MeshNet model18cls on crops of the real T1."""
    from engine_helpers import meshnet_case

    return meshnet_case(tmp_path_factory.mktemp("trt"), (48, 48, 48))


def _onnxruntime_fp32(path: Path, windows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: windows})[0]


@needs_trt
@pytest.mark.parametrize(
    ("precision", "min_agreement"), [("fp32", 0.999), ("tf32", 0.99), ("fp16", 0.99), ("int8", 0.9)]
)
def test_tensorrt_build_load_run(meshnet: dict, tmp_path: Path, precision: str, min_agreement: float) -> None:
    from engine_tools.engines.base import BuildRequest

    holdout = meshnet["holdout"][:3]  # 3 windows on a batch-2 profile: a full and a partial call
    request = BuildRequest(
        "meshnet-18cls",
        meshnet["onnx"],
        (48, 48, 48),
        1,
        18,
        calibration=meshnet["calibration"],
        options={"batch": 2},
    )
    engine = TensorRTEngine(precision)
    report = engine.build(request, tmp_path)
    assert report["tf32"] is (precision != "fp32") and report["workspace_gib"] > 4
    assert report["timing_cache"].endswith(".cache") and "-sm" in report["timing_cache"]
    logits = engine.run(holdout)
    reference = _onnxruntime_fp32(meshnet["onnx"], holdout)
    agree = (logits.argmax(1) == reference.argmax(1)).mean()
    print(f"TensorRT {precision}: argmax agreement with ONNX Runtime FP32 {agree:.4f}")
    assert logits.shape == reference.shape and agree > min_agreement
    described = engine.describe()
    assert described["bytes_on_disk"] > 0 and described["layers"]["layers"] > 0
    assert "unresolved" not in described["layers"]["by_precision"], described["layers"]
    if precision == "int8":
        assert described["layers"]["by_precision"].get("int8", 0) > 0
        assert report["qdq"]["recipe"] == "medquant" and report["qdq"]["quantized_nodes"]
    engine.use_cuda_graph = True
    assert np.allclose(engine.run(holdout), logits, atol=1e-3)
    # a second build reuses the timing cache of this TensorRT version and GPU
    assert TensorRTEngine(precision).build(request, tmp_path / "again")["timing_cache_reused"] is True
    # a cached engine whose metadata says another GPU is refused before deserialization
    meta = json.loads((tmp_path / META_FILE).read_text())
    other = tmp_path.parent / f"{tmp_path.name}-other"
    shutil.copytree(tmp_path, other)
    (other / META_FILE).write_text(json.dumps({**meta, "compute_capability": "7.5", "gpu_name": "Tesla T4"}))
    with pytest.raises(EngineMismatch, match="Tesla T4"):
        TensorRTEngine(precision).load(other)
