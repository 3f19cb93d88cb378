"""ModelOpt Q/DQ ONNX (the TensorRT INT8 input) produced on the CPU from a real network, run on ONNX Runtime.

The network is the pretrained brainchop MeshNet ``model18cls`` (21-channel dilated 3-D convolutions),
exported through ``engine_tools.networks.export_onnx`` and narrowed to 48^3 windows; the calibration and
held-out windows are crops of the real T1 in ``../shared`` after the card's own preprocessing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import meshnet_case

from engine_tools.cache import sha256_file
from engine_tools.engines.tensorrt.modelopt_qdq import (
    RECIPES,
    convert_fp16_onnx,
    exact_name_patterns,
    expand_patterns,
    modelopt_availability,
    quantize_qdq,
    recipe_dtype,
)

WINDOW = (48, 48, 48)
ok, reason = modelopt_availability()
pytestmark = pytest.mark.skipif(not ok, reason=f"ModelOpt unavailable: {reason}")


@pytest.fixture(scope="module")
def meshnet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return meshnet_case(tmp_path_factory.mktemp("qdq"), WINDOW)


def _run(path: Path, windows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: windows})[0].astype(np.float32)


def _agreement(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    agree = float((reference.argmax(1) == test.argmax(1)).mean())
    sqnr = float(10 * np.log10((reference**2).sum() / ((reference - test) ** 2).sum()))
    return agree, sqnr


@pytest.mark.parametrize(("method", "high"), [("max", "fp32"), ("entropy", "fp16")])
def test_qdq_onnx_from_real_meshnet_agrees_with_fp32(meshnet: dict, method: str, high: str) -> None:
    source_hash = sha256_file(meshnet["onnx"])
    output = meshnet["folder"] / f"qdq_{method}_{high}.onnx"
    result = quantize_qdq(
        meshnet["onnx"], meshnet["calibration"], output, calibration_method=method, high_precision_dtype=high
    )
    assert sha256_file(meshnet["onnx"]) == source_hash, "ModelOpt must work on a copy, not the input"
    assert result.path == output and output.is_file() and result.sha256 == sha256_file(output)
    assert result.op_counts.get("QuantizeLinear", 0) > 0 and result.op_counts.get("DequantizeLinear", 0) > 0
    # the 21->21 channel dilated convolutions are the INT8 candidates; the 1-channel input conv is not
    assert len(result.quantized_nodes) >= 5, result.quantized_nodes
    assert all("Conv" in name for name in result.quantized_nodes)
    reference = _run(meshnet["onnx"], meshnet["holdout"])
    quantized = _run(output, meshnet["holdout"])
    agree, sqnr = _agreement(reference, quantized)
    print(
        f"{method}/{high}: {len(result.quantized_nodes)} Q/DQ convs, argmax agreement {agree:.4f}, SQNR {sqnr:.1f} dB"
    )
    # measured here (ModelOpt 0.47, ORT 1.32): max/fp32 0.932 and 15.9 dB, entropy/fp16 0.957 and 17.9 dB;
    # every convolution but the 1-channel input one is INT8, and 48^3 crops are mostly tissue boundaries
    assert agree >= 0.90 and sqnr >= 14.0


def test_keep_higher_precision_and_no_network(meshnet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    convs = expand_patterns(meshnet["onnx"], [r"Conv"])
    kept = convs[len(convs) // 2]
    assert expand_patterns(meshnet["onnx"], [f"^{kept}$"]) == [kept]

    # ModelOpt calibrates in a spawned child: block sockets there through sitecustomize, and log
    # both that the block was installed and any connection attempt.
    site = meshnet["folder"] / "no-network-site"
    site.mkdir(exist_ok=True)
    log = site / "attempts.log"
    log.unlink(missing_ok=True)
    (site / "sitecustomize.py").write_text(
        "import socket\n"
        f"LOG = {str(log)!r}\n"
        "open(LOG, 'a').write('installed\\n')\n"
        "def _refuse(*args, **kwargs):\n"
        "    open(LOG, 'a').write('attempt %r\\n' % (args[1:],))\n"
        "    raise OSError('network blocked by test')\n"
        "socket.socket.connect = _refuse\n"
        "socket.socket.connect_ex = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    result = quantize_qdq(
        meshnet["onnx"],
        meshnet["calibration"][:4],
        meshnet["folder"] / "qdq_keep.onnx",
        high_precision_dtype="fp32",
        keep_higher_precision=[f"^{kept}$"],
    )
    assert kept in result.excluded_nodes and kept not in result.quantized_nodes
    assert result.quantized_nodes
    lines = log.read_text().splitlines()
    assert "installed" in lines, "the calibration child did not run under the socket block"
    assert not [line for line in lines if line.startswith("attempt")], lines


def test_fp16_onnx_for_strongly_typed_fp16_engine(meshnet: dict) -> None:
    import onnx

    path = convert_fp16_onnx(meshnet["onnx"], meshnet["folder"] / "fp16.onnx")
    model = onnx.load(str(path))
    types = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O kept float32
    agree, sqnr = _agreement(_run(meshnet["onnx"], meshnet["holdout"]), _run(path, meshnet["holdout"]))
    assert agree >= 0.99 and sqnr >= 30.0


def test_bad_inputs_are_named(tmp_path: Path, meshnet: dict) -> None:
    with pytest.raises(ValueError, match="calibration_method"):
        quantize_qdq(meshnet["onnx"], meshnet["calibration"], tmp_path / "x.onnx", calibration_method="mse")
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        quantize_qdq(meshnet["onnx"], meshnet["calibration"][0], tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_qdq(tmp_path / "missing.onnx", meshnet["calibration"], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="bad regex"):
        quantize_qdq(
            meshnet["onnx"], meshnet["calibration"], tmp_path / "x.onnx", keep_higher_precision=["("]
        )


def _dequantized_inputs(model: object) -> dict[str, int]:
    """Node name → how many of its inputs come from a DequantizeLinear (0 = left unquantized)."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return {
        node.name: sum(producers.get(i) == "DequantizeLinear" for i in node.input)
        for node in model.graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
    }


@pytest.fixture(scope="module")
def decoder_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small encoder/decoder with ConvTranspose, InstanceNorm and Softmax; three convolutions renamed
    to names that are prefixes of each other or hold regex characters."""
    import onnx
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 16, 3, padding=1),
        torch.nn.InstanceNorm3d(16, affine=True),
        torch.nn.ConvTranspose3d(16, 16, 2, stride=2),
        torch.nn.Conv3d(16, 16, 3, padding=1),
        torch.nn.Conv3d(16, 4, 1),
        torch.nn.Softmax(dim=1),
    ).eval()
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    torch.onnx.export(
        net,
        torch.rand(1, 16, 8, 8, 8),
        str(path),
        input_names=["input"],
        output_names=["probs"],
        dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load(str(path))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    for node, name in zip(convs, ["/x/Conv", "/x/Conv_1", "/x/Conv_2", "/head/a+b(c)[0]/Conv"], strict=True):
        node.name = name
    onnx.save(model, str(path))
    return path


def test_exclusions_are_exact_names_and_conv_transpose_stays_unquantized(
    decoder_onnx: Path, tmp_path: Path
) -> None:
    import onnx

    windows = np.random.default_rng(0).random((4, 16, 8, 8, 8), dtype=np.float32)
    excluded = ["/x/Conv", "/head/a+b(c)[0]/Conv"]
    result = quantize_qdq(
        decoder_onnx, windows, tmp_path / "qdq.onnx", nodes_to_exclude=excluded, high_precision_dtype="fp32"
    )
    dq = _dequantized_inputs(onnx.load(str(result.path)))
    assert dq["/x/Conv"] == 0 and dq["/head/a+b(c)[0]/Conv"] == 0
    # a regex "/x/Conv" would also have matched /x/Conv_1 and /x/Conv_2
    assert dq["/x/Conv_1"] > 0 and dq["/x/Conv_2"] > 0
    transposed = [name for name in dq if "ConvTranspose" in name]
    assert transposed and all(dq[name] == 0 for name in transposed)
    assert result.excluded_nodes == excluded and result.excluded_op_types == ["ConvTranspose"]
    assert any("TensorRT#4668" in note for note in result.notes)
    assert set(result.quantized_nodes) == {"/x/Conv_1", "/x/Conv_2"}

    # the card may ask for ConvTranspose to be quantized: then it is (so the check above can fail)
    kept = quantize_qdq(decoder_onnx, windows, tmp_path / "qdq_all.onnx", quantize_conv_transpose=True)
    dq_all = _dequantized_inputs(onnx.load(str(kept.path)))
    assert any(dq_all[name] > 0 for name in transposed) and kept.excluded_op_types == []


def test_exact_name_patterns_escape_regex_characters() -> None:
    import re

    patterns = exact_name_patterns(["/x/Conv", "/head/a+b(c)[0]/Conv", "/x/Conv"])
    assert patterns == [r"/x/Conv$", r"/head/a\+b\(c\)\[0\]/Conv$"]
    assert re.match(patterns[0], "/x/Conv") and not re.match(patterns[0], "/x/Conv_1")
    assert re.match(patterns[1], "/head/a+b(c)[0]/Conv")


def test_named_recipes() -> None:
    assert recipe_dtype("medptq") == "fp32" and recipe_dtype("medquant") == "fp16"
    assert "hrlblab/PTQ" in RECIPES["medptq"]["description"]
    with pytest.raises(ValueError, match="medquant, medptq"):
        recipe_dtype("paper")


def test_fp16_autocast_keeps_norm_and_softmax_fp32(decoder_onnx: Path, tmp_path: Path) -> None:
    import onnx

    windows = np.random.default_rng(1).random((2, 16, 8, 8, 8), dtype=np.float32)
    model = onnx.load(str(convert_fp16_onnx(decoder_onnx, tmp_path / "fp16.onnx", calibration=windows)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    by_op = {node.op_type: node for node in model.graph.node}
    assert types[by_op["InstanceNormalization"].output[0]] == onnx.TensorProto.FLOAT
    assert types[by_op["Conv"].input[1]] == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    reference, converted = _run(decoder_onnx, windows), _run(tmp_path / "fp16.onnx", windows)
    assert np.abs(reference - converted).max() < 1e-2


def test_tensorrt_int8_onnx_follows_the_card_options(decoder_onnx: Path, tmp_path: Path) -> None:
    """The TensorRT engine's INT8 input (no TensorRT needed to make it): the card's regexes, the guard's
    exact names and the paper's recipe reach ModelOpt, and the report says what was excluded."""
    from engine_tools.engines.base import BuildRequest
    from engine_tools.engines.tensorrt import TensorRTEngine
    from engine_tools.progress import SilentProgress

    windows = np.random.default_rng(2).random((2, 16, 8, 8, 8), dtype=np.float32)
    options = {
        "keep_higher_precision_patterns": [r"^/head/"],
        "ignored_layers": ["/x/Conv"],
        "tensorrt_recipe": "medptq",
    }
    request = BuildRequest("decoder", decoder_onnx, (8, 8, 8), 16, 4, calibration=windows, options=options)
    report: dict = {}
    path, kind, calibration_hash = TensorRTEngine("int8")._typed_onnx(
        request, tmp_path, report, SilentProgress()
    )
    assert kind == "qdq" and path.is_file() and calibration_hash
    qdq = report["qdq"]
    assert qdq["recipe"] == "medptq" and qdq["high_precision_dtype"] == "fp32"
    assert "hrlblab/PTQ" in qdq["recipe_description"]
    assert qdq["excluded_nodes"] == ["/head/a+b(c)[0]/Conv", "/x/Conv"]
    assert qdq["excluded_op_types"] == ["ConvTranspose"]
    assert set(qdq["quantized_nodes"]) == {"/x/Conv_1", "/x/Conv_2"}


def test_accuracy_guard_keeps_layers_out_of_the_modelopt_qdq_onnx(meshnet: dict, tmp_path: Path) -> None:
    """The TensorRT path takes part in the same accuracy guard: ModelOpt quantizes, ONNX Runtime runs
    the Q/DQ arithmetic on the CPU, and a kept layer is left out of the Q/DQ ONNX by name."""
    from engine_tools.engines.tensorrt.quantize import ModelOptAdapter
    from engine_tools.guard import AccuracyGuard
    from engine_tools.progress import SilentProgress

    adapter = ModelOptAdapter(meshnet["onnx"], meshnet["calibration"], WINDOW, tmp_path, SilentProgress())
    guard = AccuracyGuard(
        adapter, meshnet["holdout"], meshnet["calibration"], {"target_dice": 0.5}, SilentProgress()
    )
    model, report = guard.run()
    assert (
        report.met_target
        and report.kept_in_higher_precision == []
        and report.attempts[0]["step"] == "initial"
    )
    quantized = adapter.quantized_layers(model)
    assert report.int8_layers == len(quantized) >= 5
    assert 0.5 < report.int8_compute_fraction < 1.0  # the 1-channel input convolution stays float
    kept = adapter.keep_layers(model, quantized[:1])
    assert adapter.quantized_layers(kept) == quantized[1:]
    assert adapter.keep_layers(model, adapter.layers()) == adapter.onnx_path  # fully higher precision


def test_tensorrt_int8_build_chooses_its_qdq_onnx_through_the_shared_guard(
    meshnet: dict, tmp_path: Path
) -> None:
    """The TensorRT backend's INT8 ONNX comes from the same accuracy guard as every other backend (its
    escalation is tested on OpenVINO and ONNX Runtime; one ModelOpt calibration here keeps this fast)."""
    import onnx

    from engine_tools.engines.base import BuildRequest
    from engine_tools.engines.tensorrt.runner import TensorRTEngine
    from engine_tools.progress import SilentProgress

    request = BuildRequest(
        "meshnet",
        meshnet["onnx"],
        WINDOW,
        1,
        int(_run(meshnet["onnx"], meshnet["holdout"][:1]).shape[1]),
        calibration=meshnet["calibration"],
        validation=meshnet["holdout"],
        options={"calibration_method": "minmax", "target_dice": 0.5},
    )
    report: dict = {}
    path, kind, calibration_hash = TensorRTEngine("int8")._typed_onnx(
        request, tmp_path, report, SilentProgress()
    )
    guard = report["accuracy_guard"]
    assert kind == "qdq" and calibration_hash and path.is_file()
    assert guard["met_target"] and guard["attempts"][0]["step"] == "initial"
    assert report["kept_in_higher_precision"] == guard["kept_in_higher_precision"] == []
    dequantized = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) >= 5 and guard["int8_layers"] >= 5
