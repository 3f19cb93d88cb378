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
    engine = prepare_engine(card, backend="onnxruntime", precision="fp32", weights_dir=mirror)
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
def stored_reference(name: str):
    """The reference script ``data/<name>.py`` (its weights, input, sizes) and its stored ``.npz``."""
    import importlib.util
    import sys

    folder = Path(__file__).parent / "data"
    # the scripts import reference_weights beside them; the folder leaves sys.path again afterwards,
    # since its data/tensorrt folder would otherwise import as a bogus "tensorrt" package in later tests
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
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

    reference, expected = stored_reference("swinunetr_monai14_reference")
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


# ---------------------------------------------------------- nnU-Net v2 (TotalSegmentator archive)
NNUNET_ARCHIVE = "Dataset297_TotalSegmentator_total_3mm_1559subj"
NNUNET_PLANS = {
    "dataset_name": NNUNET_ARCHIVE,
    "plans_name": "nnUNetPlans",
    "configurations": {
        "3d_fullres": {
            "patch_size": [32, 32, 32],
            "spacing": [3.0, 3.0, 3.0],
            "normalization_schemes": ["CTNormalization"],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4,
                    "features_per_stage": [4, 8, 16, 32],
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3], [1, 3, 3]],
                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                    "n_conv_per_stage": [2, 2, 2, 2],
                    "n_conv_per_stage_decoder": [2, 2, 2],
                    "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None,
                    "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
        }
    },
    "foreground_intensity_properties_per_channel": {
        "0": {
            "max": 3071.0,
            "mean": 58.5,
            "median": 41.0,
            "min": -1024.0,
            "percentile_00_5": -963.0,
            "percentile_99_5": 1472.0,
            "std": 351.2,
        }
    },
}


def nnunet_reference(plans: dict, num_classes: int) -> torch.nn.Module:
    """The network as nnU-Net v2 builds it from ``plans.json`` (``get_network_from_plans``)."""
    import pydoc

    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        kwargs[key] = pydoc.locate(kwargs[key]) if kwargs[key] else None
    network_class = pydoc.locate(architecture["network_class_name"])
    return network_class(input_channels=1, num_classes=num_classes, deep_supervision=False, **kwargs).eval()


def nnunet_ct_normalization(image: np.ndarray, plans: dict) -> np.ndarray:
    """nnU-Net v2 ``CTNormalization.run`` on one channel."""
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    image = np.clip(image.astype(np.float32), props["percentile_00_5"], props["percentile_99_5"])
    return (image - props["mean"]) / max(props["std"], 1e-8)


def nnunet_card(**kwargs: object) -> ModelCard:
    card = get_card("nnunet-totalseg")
    full = {
        **card.network["reduced_kwargs"],
        "plans_file": {"weights_file": "plans.json"},
        "patch_size": [32, 32, 32],
        "spacing": [3.0, 3.0, 3.0],
        **kwargs,
    }
    return unpinned(small_card("nnunet-totalseg", kwargs=full))


def write_nnunet_archive(folder: Path, plans: dict, weights: dict) -> Path:
    """The TotalSegmentator release archive: plans.json and fold_0/checkpoint_final.pth as nnU-Net saves it."""
    import json
    import zipfile

    checkpoint = {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": np.float64(1e-5), "momentum": 0.99}]},
        "grad_scaler_state": None,
        "logging": {"ema_fg_dice": [np.float64(0.81), np.float64(0.83)], "lrs": [np.float64(0.01)]},
        "_best_ema": np.float64(0.8312),
        "current_epoch": 4000,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": 0,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer_4000epochs_NoMirroring",
        "inference_allowed_mirroring_axes": None,
    }
    trainer = f"{NNUNET_ARCHIVE}/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
    buffer = folder / "checkpoint_final.pth"
    torch.save(checkpoint, buffer)
    archive = folder / "nnunet-totalseg" / f"{NNUNET_ARCHIVE}.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{trainer}/plans.json", json.dumps(plans))
        zf.write(buffer, f"{trainer}/fold_0/checkpoint_final.pth")
        zf.writestr(f"{trainer}/dataset.json", json.dumps({"labels": {"background": 0}}))
    buffer.unlink()
    return archive


def test_nnunet_archive_plans_and_numpy_scalars(tmp_path: Path) -> None:
    """checkpoint_final.pth (numpy scalars, read with weights_only=True) and plans.json from the zip."""
    card = nnunet_card()
    torch.manual_seed(5)
    reference = nnunet_reference(NNUNET_PLANS, card.num_classes)
    write_nnunet_archive(tmp_path, NNUNET_PLANS, reference.state_dict())

    module = build_network(card, weights_dir=tmp_path)
    hounsfield = np.random.default_rng(1).uniform(-1100, 1600, (1, 1, 32, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logits = module(torch.from_numpy(hounsfield)).numpy()
        expected = reference(torch.from_numpy(nnunet_ct_normalization(hounsfield, NNUNET_PLANS))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_nnunet_refuses_plans_that_contradict_the_card(tmp_path: Path) -> None:
    card = nnunet_card(patch_size=[128, 128, 128])
    torch.manual_seed(5)
    write_nnunet_archive(
        tmp_path, NNUNET_PLANS, nnunet_reference(NNUNET_PLANS, card.num_classes).state_dict()
    )
    with pytest.raises(NetworkError, match=r"patch_size is \[32, 32, 32\], the card says \[128, 128, 128\]"):
        build_network(card, weights_dir=tmp_path)


# ------------------------------------------------------------- STU-Net (nnU-Net v1, Task101)
def stunet_plans(pools: list[list[int]]) -> dict:
    """An nnU-Net v1 ``plans.pkl`` dict (numpy arrays and scalars, as nnU-Net v1 writes it)."""
    from collections import OrderedDict

    stage = {
        "batch_size": 2,
        "num_pool_per_axis": [len(pools)] * 3,
        "patch_size": np.array([32, 32, 32]),
        "current_spacing": np.array([1.5, 1.5, 1.5]),
        "original_spacing": np.array([1.5, 1.5, 1.5]),
        "pool_op_kernel_sizes": pools,
        "conv_kernel_sizes": [[3, 3, 3]] * (len(pools) + 1),
    }
    intensity = OrderedDict(
        median=np.float64(41.0),
        mean=np.float64(62.4),
        sd=np.float64(344.9),
        mn=np.float64(-1024.0),
        mx=np.float64(3071.0),
        percentile_99_5=np.float64(1452.0),
        percentile_00_5=np.float64(-958.0),
    )
    return {
        "num_stages": 1,
        "num_modalities": 1,
        "modalities": {0: "CT"},
        "normalization_schemes": OrderedDict([(0, "CT")]),
        "dataset_properties": {
            "intensityproperties": OrderedDict([(0, intensity)]),
            "all_classes": list(range(1, 105)),
        },
        "plans_per_stage": {0: stage},
        "base_num_features": 32,
        "use_mask_for_norm": OrderedDict([(0, False)]),
        "data_identifier": "nnUNetData_plans_v2.1",
    }


def test_stunet_v1_checkpoint_and_plans_pkl(tmp_path: Path) -> None:
    """base_ep4k.model (nnU-Net v1 checkpoint with numpy scalars) and plans.pkl, both from a mirror."""
    import pickle

    from engine_tools.networks.zoo.stunet import STUNet

    card = small_card("stunet-totalseg")
    kwargs = {**card.network["kwargs"], "plans_file": {"weights_file": "plans.pkl"}}
    kwargs.update(patch_size=[32, 32, 32], spacing=[1.5, 1.5, 1.5])
    card = small_card("stunet-totalseg", kwargs=kwargs)
    pools = [[2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    plans = stunet_plans(pools)
    torch.manual_seed(9)
    reference = STUNet(1, card.num_classes, kwargs["depth"], kwargs["dims"], pools).eval()
    folder = tmp_path / card.id
    folder.mkdir()
    torch.save(
        {
            "epoch": 4000,
            "state_dict": reference.state_dict(),
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-5}]},
            "lr_scheduler_state_dict": None,
            "plot_stuff": ([np.float64(0.9)], [np.float64(0.8)], [], [np.float64(0.85)]),
            "best_stuff": (3999, np.float64(-0.91), 3999, np.float64(0.86)),
            "amp_grad_scaler": {"scale": 65536.0},
        },
        folder / "base_ep4k.model",
    )
    with open(folder / "plans.pkl", "wb") as stream:
        pickle.dump(plans, stream)

    module = build_network(card, weights_dir=tmp_path)
    props = plans["dataset_properties"]["intensityproperties"][0]
    hounsfield = np.random.default_rng(2).uniform(-1100, 1600, (1, 1, 32, 32, 32)).astype(np.float32)
    normalised = (
        np.clip(hounsfield, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]
    ) / props["sd"]
    with torch.no_grad():
        logits = module(torch.from_numpy(hounsfield)).numpy()
        expected = reference(torch.from_numpy(normalised.astype(np.float32))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("unpickled",))

    with open(folder / "plans.pkl", "wb") as stream:
        pickle.dump({**plans, "x": Payload()}, stream)
    with pytest.raises(NetworkError, match="builtins.print"):
        build_network(card, weights_dir=tmp_path)


def test_stunet_labels_follow_task101_and_weights_are_manual(tmp_path: Path) -> None:
    card = get_card("stunet-totalseg")
    names = [label.name for label in card.labels[1:]]
    assert names == sorted(names) and names[0] == "adrenal_gland_left" and names[-1] == "vertebrae_T9"
    with pytest.raises(WeightsUnavailable, match=r"drive\.google\.com.*DIR/stunet-totalseg/base_ep4k\.model"):
        build_network(card, weights_dir=tmp_path)


# ------------------------------------------------------------------ MONAI bundles: SegResNet, VISTA3D
def write_bundle_zip(folder: Path, bundle: str, weights: dict) -> Path:
    """A MONAI bundle archive: ``<bundle>/configs/...`` and ``<bundle>/models/model.pt`` (bare state dict)."""
    import zipfile

    torch.save(weights, folder / "model.pt")
    archive = folder / f"{bundle}_v0.6.0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{bundle}/configs/metadata.json", '{"version": "0.6.0"}')
        zf.write(folder / "model.pt", f"{bundle}/models/model.pt")
    (folder / "model.pt").unlink()
    return archive


def test_segresnet_bundle_zip_equals_the_bundle_network(tmp_path: Path) -> None:
    """wholeBody_ct_segmentation: the card's network from the bundle zip equals the bundle's network_def."""
    from monai.networks.nets import SegResNet

    bundle_network_def = {  # configs/inference.json "network_def" of the bundle
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 105,
        "init_filters": 32,
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
        "dropout_prob": 0.2,
    }
    card = unpinned(get_card("segresnet-wholebody"))
    torch.manual_seed(11)
    reference = SegResNet(**bundle_network_def).eval()
    (tmp_path / card.id).mkdir()
    write_bundle_zip(tmp_path / card.id, card.weights["files"][0]["bundle"], reference.state_dict())
    module = build_network(card, weights_dir=tmp_path)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=1e-4, atol=1e-4)


def test_vista3d_bundle_checkpoint_equals_vista3d132(tmp_path: Path) -> None:
    """vista3d: the bundle's model.pt of ``vista3d132`` loads into the card's automatic-segmentation module,
    which equals VISTA3D with every class prompted."""
    from monai.networks.nets import vista3d132

    card = unpinned(get_card("vista3d"))
    torch.manual_seed(12)
    reference = vista3d132(in_channels=1).eval()
    (tmp_path / card.id).mkdir()
    torch.save(reference.state_dict(), tmp_path / card.id / "model.pt")
    module = build_network(card, weights_dir=tmp_path)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = module(x)
        theirs = reference(x, class_vector=torch.arange(1, 133).view(-1, 1), transpose=True)
    automatic = [
        c for c in range(1, 133) if c not in (2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132)
    ]
    torch.testing.assert_close(
        ours[:, automatic], theirs[:, [c - 1 for c in automatic]], rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------- UNesT (MONAI bundle code, not part of MONAI)
def test_unest_card_reproduces_the_bundle_network(tmp_path: Path) -> None:
    """The card's UNesT with a bundle-format model.pt equals the bundle's own UNesT (stored reference)."""
    from engine_tools.networks.zoo.unest import unest

    reference, expected = stored_reference("unest_bundle_reference")
    kwargs = {**reference.KWARGS, "img_size": reference.WINDOW[0]}
    card = unpinned(small_card("unest-wholebrain", kwargs=kwargs, reduced_window=list(reference.WINDOW)))
    ours = unest(**kwargs)
    assert sorted(ours.state_dict()) == sorted(expected["state_dict_keys"].tolist())
    (tmp_path / card.id).mkdir()
    torch.save(reference.publisher_weights(ours), tmp_path / card.id / "model.pt")
    with torch.no_grad():
        logits = build_network(card, weights_dir=tmp_path)(reference.seeded_input(reference.WINDOW)).numpy()
    stride = reference.STRIDE
    np.testing.assert_allclose(
        logits[:, :, ::stride, ::stride, ::stride], expected["logits_strided"], atol=1e-4
    )
    np.testing.assert_allclose(logits.mean(axis=(0, 2, 3, 4)), expected["class_means"], atol=1e-5)
