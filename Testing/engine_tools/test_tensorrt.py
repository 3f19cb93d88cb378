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


def test_availability_gives_a_reason() -> None:
    ok, reason = TensorRTEngine.availability()
    assert isinstance(reason, str) and reason
    if not ok:
        print(f"TensorRT unavailable here: {reason}")
        assert "tensorrt" in reason.lower() or "gpu" in reason.lower()


# -- real TensorRT (GPU machines only) -----------------------------------------------------------------
trt_ok, trt_reason = TensorRTEngine.availability()
needs_trt = pytest.mark.skipif(not trt_ok, reason=f"TensorRT engine not runnable here: {trt_reason}")


@pytest.fixture(scope="module")
def tiny_unet_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 3, (16, 32, 64), (2, 2), num_res_units=1).eval()
    path = tmp_path_factory.mktemp("trt") / "unet.onnx"
    torch.onnx.export(
        net,
        torch.rand(1, 1, 32, 32, 32),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path, net


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_build_load_run(tiny_unet_onnx: tuple[Path, object], tmp_path: Path, precision: str) -> None:
    import torch

    from engine_tools.engines.base import BuildRequest

    path, net = tiny_unet_onnx
    windows = np.random.default_rng(0).random((6, 1, 32, 32, 32), dtype=np.float32)
    request = BuildRequest(
        "tiny-unet", path, (32, 32, 32), 1, 3, calibration=windows[:4], options={"batch": 2}
    )
    engine = TensorRTEngine(precision)
    engine.build(request, tmp_path)
    logits = engine.run(windows[4:])
    with torch.inference_mode():
        reference = net(torch.from_numpy(windows[4:])).numpy()
    agree = (logits.argmax(1) == reference.argmax(1)).mean()
    assert logits.shape == reference.shape and agree > (0.99 if precision != "int8" else 0.9)
    described = engine.describe()
    assert described["bytes_on_disk"] > 0 and described["layers"]["layers"] > 0
    if precision == "int8":
        assert described["layers"]["by_precision"].get("int8", 0) > 0
    engine.use_cuda_graph = True
    assert np.allclose(engine.run(windows[4:]), logits, atol=1e-3)
    # a cached engine whose metadata says another GPU is refused before deserialization
    meta = json.loads((tmp_path / META_FILE).read_text())
    other = tmp_path.parent / f"{tmp_path.name}-other"
    shutil.copytree(tmp_path, other)
    (other / META_FILE).write_text(json.dumps({**meta, "compute_capability": "7.5", "gpu_name": "Tesla T4"}))
    with pytest.raises(EngineMismatch, match="Tesla T4"):
        TensorRTEngine(precision).load(other)
