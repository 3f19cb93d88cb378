"""Networks from cards: the TF.js loader against independent references, ONNX export, formats."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import installed_weights_cache, require_installed, shared_path

from engine_tools.cache import partial_artifacts
from engine_tools.networks import NetworkError, build_network, export_onnx, torch_factory, validate_onnx
from engine_tools.networks.tfjs import TfjsFormatError, build_tfjs_module, describe_tfjs, read_weights
from engine_tools.registry import ModelCard, get_card, load_cards
from engine_tools.weights import WeightsError, ensure_weights

BRAINCHOP_MODELS = ("model5_gw_ae", "model11_gw_ae", "model18cls", "model21_104class", "mindgrab")


def _with_window(card: ModelCard, size: int) -> ModelCard:
    raw = copy.deepcopy(card.raw)
    raw["window"]["size"] = [size] * 3
    return ModelCard.from_dict(raw, card.path)


@pytest.fixture(scope="module")
def brainchop() -> Path:
    return shared_path("models", "brainchop")


def test_all_brainchop_cards_load_and_match_their_files(brainchop: Path) -> None:
    cards = load_cards()
    for name in BRAINCHOP_MODELS:
        card = cards[f"brainchop-{name}"]
        info = describe_tfjs(brainchop / name / "model.json")
        assert card.num_classes == info["num_classes"] == len(card.labels)
        assert card.network["receptive_field"] == info["receptive_field"]
        module = build_network(card, weights_dir=brainchop)
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv3d)]
        assert convs[-1].out_channels == card.num_classes and not module.training
        # every weight file is pinned and matches the shared copy
        for entry in card.weights["files"]:
            data = (brainchop / name / entry["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
            assert entry["url"].startswith("https://raw.githubusercontent.com/neuroneural/brainchop/")


def test_first_layers_match_scipy_reference(brainchop: Path) -> None:
    """Conv3D kernel layout [kd,kh,kw,in,out], dilation and 'same' padding against scipy.ndimage."""
    from scipy import ndimage

    model_json = brainchop / "model21_104class" / "model.json"
    weights = read_weights(model_json)
    module = build_tfjs_module(model_json)
    x = np.random.default_rng(1).random((1, 1, 20, 22, 18), dtype=np.float32)

    def conv_same(volume: np.ndarray, kernel: np.ndarray, bias: np.ndarray, dilation: int) -> np.ndarray:
        # volume [C_in, D, H, W]; kernel [kd, kh, kw, in, out] (TF layout), zero padding
        k = kernel.shape[0]
        dilated = np.zeros(((k - 1) * dilation + 1,) * 3 + kernel.shape[3:], np.float64)
        dilated[::dilation, ::dilation, ::dilation] = kernel
        out = np.zeros((kernel.shape[4], *volume.shape[1:]))
        for o in range(kernel.shape[4]):
            for i in range(kernel.shape[3]):
                out[o] += ndimage.correlate(volume[i].astype(np.float64), dilated[..., i, o], mode="constant")
            out[o] += bias[o]
        return out

    layer1 = np.maximum(conv_same(x[0], weights["19/kernel"], weights["19/bias"], 1), 0)
    layer2 = np.maximum(conv_same(layer1, weights["21/kernel"], weights["21/bias"], 2), 0)
    with torch.no_grad():
        torch_out = module[:4](torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(torch_out, layer2, rtol=1e-4, atol=1e-4)


def test_model5_equals_niivue_onnx_export_of_the_same_network(brainchop: Path, tmp_path: Path) -> None:
    """niivue publishes model5_gw_ae as ONNX (spatial axes reversed): an independent conversion."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    source = onnx.load(str(shared_path("models", "niivue", "gwm_meshnet.onnx")))
    for value in [*source.graph.input, *source.graph.output]:  # pure conv graph: free the spatial dims
        for axis in (2, 3, 4):
            value.type.tensor_type.shape.dim[axis].dim_param = f"s{axis}"
    path = tmp_path / "gwm_dynamic.onnx"
    onnx.save(source, str(path))
    x = np.random.default_rng(0).random((1, 1, 40, 36, 44), dtype=np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.ascontiguousarray(x.transpose(0, 1, 4, 3, 2))}
    )[0]
    with torch.no_grad():
        ours = build_tfjs_module(brainchop / "model5_gw_ae" / "model.json")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, reference.transpose(0, 1, 4, 3, 2), rtol=1e-4, atol=2e-4)


def test_three_class_model_segments_real_t1_anatomically(brainchop: Path) -> None:
    """model11 on a central 96^3 crop of the real T1: WM brighter than GM, plausible tissue fractions."""
    ort = pytest.importorskip("onnxruntime")
    nib = pytest.importorskip("nibabel")
    from engine_tools.volumes import normalize_intensity

    card = _with_window(get_card("brainchop-model11_gw_ae"), 96)
    t1 = np.asarray(nib.load(str(shared_path("data", "mri", "t1_crop.nii.gz"))).dataobj, np.float32)
    scaled, _ = normalize_intensity(t1, card.preprocessing["intensity"])
    crop = (slice(80, 176), slice(56, 152), slice(80, 176))  # nibabel order of the LIA volume
    session = ort.InferenceSession(
        str(export_onnx(card, weights_dir=brainchop)), providers=["CPUExecutionProvider"]
    )
    logits = session.run(None, {"input": np.ascontiguousarray(scaled[crop])[None, None]})[0][0]
    labels = logits.argmax(0)
    names = {lab.value: lab.name.lower() for lab in card.labels}
    white = next(v for v, n in names.items() if "white" in n)
    grey = next(v for v, n in names.items() if "grey" in n or "gray" in n)
    raw = t1[crop]
    assert raw[labels == white].mean() > raw[labels == grey].mean() + 10  # T1: WM brighter than GM
    assert raw[labels == grey].mean() > raw[labels == 0].mean()
    white_fraction, grey_fraction = (labels == white).mean(), (labels == grey).mean()
    assert 0.15 < white_fraction < 0.7 and 0.1 < grey_fraction < 0.6, (white_fraction, grey_fraction)


@pytest.mark.parametrize("model", ["model18cls", "mindgrab"])
def test_export_onnx_matches_torch_and_is_cached(model: str, brainchop: Path, isolated_cache: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    card = _with_window(get_card(f"brainchop-{model}"), 24)
    path = export_onnx(card, weights_dir=brainchop)
    info = validate_onnx(path)
    assert info["input"] == "input" and info["outputs"] == ["logits"]
    assert info["input_shape"][1:] == [1, 24, 24, 24] and isinstance(info["input_shape"][0], str)
    x = np.random.default_rng(2).random((2, 1, 24, 24, 24), dtype=np.float32)
    with torch.no_grad():
        expected = build_network(card, weights_dir=brainchop)(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    mtime = path.stat().st_mtime_ns
    assert export_onnx(card, weights_dir=brainchop) == path and path.stat().st_mtime_ns == mtime
    assert partial_artifacts(isolated_cache) == []


def test_monai_builder_with_state_dict_and_random_weights(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    ort = pytest.importorskip("onnxruntime")
    from monai.networks.nets import UNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]}
    torch.manual_seed(5)
    trained = UNet(**kwargs).eval()
    checkpoint = tmp_path / "unet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, checkpoint)
    data = checkpoint.read_bytes()
    raw = {
        "id": "tiny-unet",
        "title": "t",
        "task": "t",
        "modality": "CT",
        "labels": [{"value": i, "name": f"c{i}"} for i in range(3)],
        "preprocessing": {},
        "window": {"size": [16, 16, 16]},
        "network": {
            "format": "monai",
            "builder": "monai.networks.nets.UNet",
            "kwargs": kwargs,
            "checkpoint": {"key": "state_dict", "strip_prefix": "module."},
        },
        "weights": {
            "files": [
                {
                    "name": "unet.pt",
                    "url": "http://127.0.0.1:9/unet.pt",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                }
            ]
        },
    }
    card = ModelCard.from_dict(raw)
    x = torch.rand(1, 1, 16, 16, 16)
    module = build_network(card, weights_dir=tmp_path)
    with torch.no_grad():
        assert torch.allclose(module(x), trained(x))
    factory = torch_factory(card, weights_dir=tmp_path)
    assert factory is not None and factory() is not factory()
    random = build_network(card, random_weights=True)  # no weights needed at all
    with torch.no_grad():
        assert not torch.allclose(random(x), trained(x))
    path = export_onnx(card, weights_dir=tmp_path)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[
        0
    ]
    np.testing.assert_allclose(got, trained(x).detach().numpy(), atol=1e-4)


def test_torchscript_requires_a_pinned_file(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Conv3d(1, 2, 1))
    path = tmp_path / "net.pt"
    scripted.save(str(path))
    raw = {
        "id": "ts",
        "title": "t",
        "task": "t",
        "modality": "MR",
        "labels": [{"value": 0, "name": "a"}, {"value": 1, "name": "b"}],
        "preprocessing": {},
        "window": {"size": 8},
        "network": {"format": "torchscript", "file": "net.pt"},
        "weights": {"files": [{"name": "net.pt", "path": str(path), "sha256": None}]},
    }
    with pytest.raises(NetworkError, match="not pinned"):
        build_network(ModelCard.from_dict(raw))
    raw["weights"]["files"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    module = build_network(ModelCard.from_dict(raw))
    assert module(torch.rand(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_tfjs_errors_name_the_problem(brainchop: Path, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.json").write_bytes((brainchop / "model5_gw_ae" / "model.json").read_bytes())
    (folder / "group1-shard1of1.bin").write_bytes(
        (brainchop / "model5_gw_ae" / "group1-shard1of1.bin").read_bytes()[:-8]
    )
    with pytest.raises(TfjsFormatError, match="too few|describes"):
        build_tfjs_module(folder / "model.json")
    (folder / "group1-shard1of1.bin").unlink()
    with pytest.raises(TfjsFormatError, match="group1-shard1of1.bin not found"):
        build_tfjs_module(folder / "model.json")


def _installed_deepbet(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The deepbet weights that the install step fetched (`medquant fetch deepbet-brain`), checksummed."""
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(installed_weights_cache()))
    try:
        return ensure_weights(get_card("deepbet-brain"), allow_download=False)["model.pt"]
    except WeightsError as exc:
        require_installed(
            "deepbet weights", f"run `bash .ci/install.sh` or `medquant fetch deepbet-brain` ({exc})"
        )
        raise


def test_deepbet_torchscript_from_installed_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = _installed_deepbet(monkeypatch).parent
    card = _with_window(get_card("deepbet-brain"), 64)
    module = build_network(card, weights_dir=mirror)
    with torch.no_grad():
        out = module(torch.rand(1, 1, 64, 64, 64))
    assert out.shape == (1, 2, 64, 64, 64)
    assert torch.allclose(out.sum(1), torch.ones(1, 64, 64, 64), atol=1e-4)  # softmax probabilities
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(3).random((1, 1, 64, 64, 64), dtype=np.float32)
    exported = ort.InferenceSession(
        str(export_onnx(card, weights_dir=mirror)), providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(exported.run(None, {"input": x})[0], expected, atol=1e-2)
