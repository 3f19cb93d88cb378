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
from shared_data import shared_path

from engine_tools.cache import sha256_file
from engine_tools.engines.tensorrt.modelopt_qdq import (
    convert_fp16_onnx,
    expand_patterns,
    modelopt_availability,
    quantize_qdq,
    set_static_window,
)

WINDOW = (48, 48, 48)
ok, reason = modelopt_availability()
pytestmark = pytest.mark.skipif(not ok, reason=f"ModelOpt unavailable: {reason}")


def _windows(array: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` crops of ``WINDOW`` inside the head (centre region of the conformed volume)."""
    rng = np.random.default_rng(seed)
    _, *shape = array.shape
    crops = []
    for _ in range(count):
        start = [int(rng.integers(s // 4, 3 * s // 4 - w)) for s, w in zip(shape, WINDOW, strict=True)]
        z, y, x = start
        crops.append(array[:, z : z + WINDOW[0], y : y + WINDOW[1], x : x + WINDOW[2]])
    return np.ascontiguousarray(np.stack(crops), dtype=np.float32)


@pytest.fixture(scope="module")
def meshnet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from engine_tools.networks import export_onnx
    from engine_tools.registry import get_card
    from engine_tools.volumes import preprocess, read_image

    brainchop = shared_path("models", "brainchop")
    t1 = shared_path("data", "mri", "t1_crop.nii.gz")
    card = get_card("brainchop-model18cls")
    folder = tmp_path_factory.mktemp("qdq")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDQUANT_CACHE_DIR", str(folder / "cache"))
        full = export_onnx(card, weights_dir=brainchop / "model18cls")
    onnx_path = set_static_window(full, folder / "model18cls_48.onnx", WINDOW)
    array = preprocess(read_image(t1), card).array
    return {
        "onnx": onnx_path,
        "folder": folder,
        "calibration": _windows(array, 12, seed=0),
        "holdout": _windows(array, 4, seed=1),
    }


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
