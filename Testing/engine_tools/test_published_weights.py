"""The seed cards load their publishers' weight files as published.

Each test writes random weights in the publisher's exact file format (an ONNX exported with
initializers as graph inputs, a MONAI bundle ``model.pt`` or its zip, an nnU-Net archive with
``checkpoint_final.pth`` holding numpy scalars and ``plans.json``, an nnU-Net v1 ``.model`` with
``plans.pkl``), puts it in a weights mirror, loads it through ``build_network``/``export_onnx`` and
compares the outputs with a reference implementation on the same weights. Networks are reduced in
width and window so that the tests stay fast; the loading code is the one full-size cards use.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine_tools.networks import NetworkError, build_network, export_onnx
from engine_tools.pipeline import prepare_engine
from engine_tools.registry import ModelCard, get_card
from engine_tools.weights import WeightsUnavailable


def small_card(model_id: str, **network: object) -> ModelCard:
    """The seed card ``model_id`` (same id, weights entries and loading spec) at its reduced size."""
    card = get_card(model_id)
    data = copy.deepcopy(card.raw)
    data["network"]["kwargs"] = data["network"]["reduced_kwargs"]
    data["network"].update(network)
    data["window"]["size"] = data["network"].get("reduced_window", data["window"]["size"])
    return ModelCard.from_dict(data, card.path)


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x.numpy()})[0]


def randomise_batchnorm(module: torch.nn.Module) -> None:
    """Non-trivial running statistics, so that a BatchNorm folded by the publisher's export matters."""
    generator = torch.Generator().manual_seed(3)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm3d):
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)


# ------------------------------------------------------------------- U-Net / TransUNet (MedPTQ ONNX)
@pytest.mark.parametrize("model_id", ["unet-btcv", "transunet-btcv"])
def test_published_onnx_is_the_export(model_id: str, tmp_path: Path) -> None:
    """The MedPTQ FP32 ONNX (opset 16, fixed batch 1, initializers as inputs, output 'output')."""
    from engine_tools.networks.zoo.build import build_zoo_network

    card = small_card(model_id)
    reference = build_zoo_network(card, seed=7)
    randomise_batchnorm(reference)
    spec = card.network["published_onnx"]
    mirror = tmp_path / "mirror"
    (mirror / card.id).mkdir(parents=True)
    published = mirror / card.id / spec["file"]
    with torch.no_grad():
        torch.onnx.export(
            reference,
            (torch.zeros(1, 1, *card.window_size),),
            str(published),
            input_names=[spec["input"]],
            output_names=[spec["output"]],
            keep_initializers_as_inputs=True,
            opset_version=spec["opset"],
            dynamo=False,
        )
    original = onnx.load(str(published))
    assert len(original.graph.input) > 1, "the publisher's format lists initializers as inputs"

    exported = export_onnx(card, weights_dir=mirror)
    model = onnx.load(str(exported))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {p.key: p.value for p in model.metadata_props}["medquant.batch"] == "1"
    x = torch.rand(1, 1, *card.window_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x).numpy()
    np.testing.assert_allclose(run_onnx(exported, x), expected, rtol=1e-3, atol=1e-4)
    assert export_onnx(card, weights_dir=mirror) == exported  # cached
    engine = prepare_engine(card, "onnxruntime", "fp32", weights_dir=mirror)
    np.testing.assert_allclose(engine.run(x.numpy()), expected, rtol=1e-3, atol=1e-4)

    with pytest.raises(NetworkError, match="ONNX-based backend"):
        build_network(card, weights_dir=mirror)
    assert isinstance(build_network(card, random_weights=True), torch.nn.Module)


def test_published_onnx_missing_says_what_to_do(tmp_path: Path) -> None:
    card = small_card("unet-btcv")
    data = copy.deepcopy(card.raw)
    data["weights"]["files"][0]["url"] = "http://127.0.0.1:9/unet_fp32.onnx"  # nothing listens there
    card = ModelCard.from_dict(data, card.path)
    with pytest.raises(WeightsUnavailable) as info:
        export_onnx(card, weights_dir=tmp_path)
    message = str(info.value)
    assert "FP32 ONNX file (unet_fp32.onnx)" in message and "--weights-dir" in message


# ------------------------------------------------------------- SwinUNETR (MONAI bundle, MONAI 1.4)
def _swinunetr_reference():
    import importlib.util

    path = Path(__file__).parent / "data" / "swinunetr_monai14_reference.py"
    spec = importlib.util.spec_from_file_location("swinunetr_monai14_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, np.load(module.OUTPUT)


def unpinned(card: ModelCard) -> ModelCard:
    """``card`` with its checksums removed (the test writes its own random file under the same name)."""
    data = copy.deepcopy(card.raw)
    for entry in data["weights"]["files"]:
        for key in ("sha256", "md5", "size", "member_sha256", "member_size"):
            entry.pop(key, None)
    return ModelCard.from_dict(data, card.path)


def test_swinunetr_card_reproduces_monai_14(tmp_path: Path) -> None:
    """The card's module with the bundle's ``model.pt`` equals MONAI 1.4's SwinUNETR on the same weights."""
    from monai.networks.nets import SwinUNETR

    reference, expected = _swinunetr_reference()
    card = unpinned(
        small_card("swinunetr-btcv", kwargs=dict(reference.KWARGS), reduced_window=list(reference.WINDOW))
    )
    weights = reference.publisher_weights(SwinUNETR(**reference.KWARGS))
    (tmp_path / card.id).mkdir()
    torch.save(weights, tmp_path / card.id / "model.pt")  # a MONAI bundle's model.pt: the bare state dict

    x = reference.reference_input()
    with torch.no_grad():
        logits = build_network(card, weights_dir=tmp_path)(x).numpy()
        current_monai = SwinUNETR(**reference.KWARGS).eval()
        current_monai.load_state_dict(weights)
        newer_order = current_monai(x).numpy()
    stride = reference.STRIDE
    np.testing.assert_allclose(
        logits[:, :, ::stride, ::stride, ::stride], expected["logits_strided"], atol=1e-4
    )
    np.testing.assert_allclose(logits.mean(axis=(0, 2, 3, 4)), expected["class_means"], atol=1e-5)
    # the reference tells the two slice orders apart (MONAI >= 1.5's default differs on these weights)
    assert np.abs(newer_order[:, :, ::stride, ::stride, ::stride] - expected["logits_strided"]).max() > 1e-2
