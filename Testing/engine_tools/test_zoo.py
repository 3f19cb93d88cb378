"""The eight seed networks: cards, builders, checkpoints, and export → OpenVINO INT8 → segment → compare.

CI runs every model at the *reduced* width its card declares (``network.reduced_kwargs``), with random
(seeded) weights: the published weights are not reachable from CI. With random weights Dice against a
reference is meaningless, so the pipeline test asserts what does not depend on training: the FP32
export reproduces PyTorch, INT8 kernels really execute, the label map has the input geometry and only
the card's label values, and the INT8-vs-FP32 agreement is computed. Full-size numbers: bench/zoo_bench.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_tools.networks.zoo import SEED_MODELS, CheckpointError, load_checkpoint
from engine_tools.networks.zoo.build import build_zoo_network, export_module_onnx, reduced_card
from engine_tools.registry import load_cards

ZOO = list(SEED_MODELS)
EXPECTED_LABELS = {
    "unet-btcv": 14,
    "transunet-btcv": 14,
    "swinunetr-btcv": 14,
    "segresnet-wholebody": 105,
    "unest-wholebrain": 133,
    "vista3d": 133,
    "nnunet-totalseg": 118,
    "stunet-totalseg": 105,
}


@pytest.fixture(scope="module")
def cards():
    return load_cards()


# ------------------------------------------------------------------------------------------ cards
@pytest.mark.parametrize("model_id", ZOO)
def test_card_is_complete(cards, model_id: str) -> None:
    card = cards[model_id]
    assert len(card.labels) == EXPECTED_LABELS[model_id] == card.num_classes
    values = [label.value for label in card.labels]
    assert values == sorted(set(values)) and values[0] == 0 and card.labels[0].name == "background"
    names = [label.name for label in card.labels]
    assert len(set(names)) == len(names), "label names must be unique"
    assert card.network["format"] in ("monai", "torch")
    assert "reduced_kwargs" in card.network and "reduced_note" in card.network
    assert card.weights["files"] and card.weights.get("licence") and card.weights.get("source")
    for entry in card.weights["files"]:
        assert (entry.get("url") or entry.get("download_page")).startswith("https://")
        assert bool(entry.get("url")) != bool(entry.get("manual")), "manual entries have no direct URL"
        assert entry.get("sha256") or entry.get("sha256_note"), "say why a checksum is missing"
    assert card.preprocessing["intensity"]["rule"] in ("window", "zscore", "none")
    names = {entry["name"] for entry in card.weights["files"]}
    for key, value in card.network["kwargs"].items():
        if isinstance(value, dict) and "weights_file" in value:
            assert value["weights_file"] in names, f"network.kwargs.{key} names a file the card does not list"
    kwargs = card.network["kwargs"]
    if "plans_file" in kwargs:  # patch size and spacing are checked against the published plans
        assert list(kwargs["patch_size"]) == list(card.window_size)
        assert list(kwargs["spacing"]) == list(card.preprocessing["spacing"])
    checkpoint = card.network.get("checkpoint", {}).get("file")
    assert checkpoint is None or checkpoint in names
    if card.quantization.get("model_type") == "transformer":
        assert card.quantization["keep_higher_precision"], "transformers keep Softmax/LayerNorm in float"


def test_published_sizes_match_the_publications(cards) -> None:
    """Parameter counts of full-size builders against the published figures (no weights needed)."""

    def millions(model_id: str) -> float:
        module = build_zoo_network(cards[model_id])
        return sum(p.numel() for p in module.parameters()) / 1e6

    assert millions("stunet-totalseg") == pytest.approx(58.26, abs=0.01)  # STU-Net README: STU-Net-B 58.26M
    # MedPTQ TensorRT FP32 engine: 23.11 MB ≈ 5.8M float32 parameters
    assert millions("unet-btcv") * 4 == pytest.approx(23.11, rel=0.05)


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_loads_wrapped_state_dict(tmp_path: Path, cards) -> None:
    card = reduced_card(cards["unet-btcv"])
    trained = build_zoo_network(card, seed=1)
    checkpoint = tmp_path / "unet.pth"
    wrapped = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"model_state_dict": wrapped, "epoch": 499}, checkpoint)
    loaded = build_zoo_network(card, checkpoint=checkpoint, seed=2)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_refuses_pickled_objects_and_mismatches(tmp_path: Path, cards) -> None:
    card = reduced_card(cards["unet-btcv"])
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": build_zoo_network(card).state_dict(), "when": Path("/")}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(build_zoo_network(card), unsafe)
    other = tmp_path / "other.pth"
    torch.save(build_zoo_network(reduced_card(cards["stunet-totalseg"])).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(build_zoo_network(card), other)


def test_vista3d_auto_matches_the_class_prompted_network(cards) -> None:
    """The export wrapper equals VISTA3D.forward with every class prompted (plus background channel)."""
    card = reduced_card(cards["vista3d"])
    wrapper = build_zoo_network(card)
    image = torch.randn(1, 1, *card.window_size)
    with torch.no_grad():
        ours = wrapper(image)
        theirs = wrapper.vista(image, class_vector=torch.arange(1, 133).view(-1, 1), transpose=True)
    assert ours.shape == (1, 133, *card.window_size)
    assert torch.all(ours[:, 0] == 0)
    included = [
        c for c in range(1, 133) if c not in (2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132)
    ]
    torch.testing.assert_close(ours[:, included], theirs[:, [c - 1 for c in included]], rtol=1e-4, atol=1e-4)
    assert float(ours[:, 2].max()) < -1000  # 'kidney' super-class never wins in automatic mode


# ----------------------------------------------------------------------------- the full pipeline
def _crop_center(image, fraction: tuple[float, float, float]):
    import SimpleITK as sitk

    size = image.GetSize()
    new = [max(1, int(s * f)) for s, f in zip(size, fraction, strict=True)]
    start = [(s - n) // 2 for s, n in zip(size, new, strict=True)]
    return sitk.RegionOfInterest(image, new, start)


@pytest.fixture(scope="module")
def ct_image():
    from shared_data import shared_path

    from engine_tools.volumes import read_image

    return _crop_center(read_image(shared_path("data", "ct", "example_ct_sm.nii.gz")), (0.5, 0.5, 1.0))


@pytest.fixture(scope="module")
def mri_image():
    from shared_data import shared_path

    from engine_tools.volumes import read_image

    return _crop_center(read_image(shared_path("data", "mri", "mni152_2009_t1.nii.gz")), (0.3, 0.3, 0.3))


def _calibration_windows(array: np.ndarray, window: tuple[int, int, int], count: int = 2) -> np.ndarray:
    """``count`` real windows from a preprocessed volume (zero-padded when the volume is smaller)."""
    from engine_tools.calibration_sampling import evenly_spaced_windows

    return evenly_spaced_windows(array, window, count)


@pytest.mark.parametrize("model_id", ZOO)
def test_reduced_model_export_int8_segment_compare(
    cards, model_id: str, tmp_path: Path, ct_image, mri_image
) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is the CPU INT8 engine")
    pytest.importorskip("nncf", reason="NNCF quantizes for OpenVINO")
    if model_id == "nnunet-totalseg":
        pytest.importorskip(
            "dynamic_network_architectures", reason="nnU-Net needs dynamic-network-architectures"
        )
    from engine_tools.accuracy import agreement_dice, sqnr_db
    from engine_tools.networks.zoo.build import openvino_engines
    from engine_tools.segment import segment_image
    from engine_tools.volumes import preprocess

    card = reduced_card(cards[model_id])  # reduced width, random weights: CI only
    image = mri_image if card.modality == "MR" else ct_image
    module = build_zoo_network(card)
    onnx_path = export_module_onnx(module, tmp_path / "model.onnx", card.in_channels, card.window_size)
    prep = preprocess(image, card)
    windows = _calibration_windows(prep.array, card.window_size)
    engines = {
        precision: engine
        for precision, engine, _ in openvino_engines(card, onnx_path, windows, ("fp32", "int8"), tmp_path)
    }

    # The FP32 export reproduces PyTorch on a real window (strict f32 inference).
    with torch.no_grad():
        reference = module(torch.from_numpy(windows[:1])).numpy()
    assert (
        engines["fp32"].run(windows[:1]).shape == reference.shape == (1, card.num_classes, *card.window_size)
    )
    assert sqnr_db(reference, engines["fp32"].run(windows[:1])) > 40.0

    kernels = engines["int8"].describe()["kernels"]
    assert kernels["convolutions"]["int8"] > 0, (
        f"no INT8 convolution kernel executed: {kernels['by_primitive']}"
    )

    results = {p: segment_image(e, card, prep, overlap=0.0) for p, e in engines.items()}
    allowed = {label.value for label in card.labels}
    for result in results.values():
        assert result.labels.GetSize() == image.GetSize()
        assert result.labels.GetSpacing() == pytest.approx(image.GetSpacing())
        assert set(np.unique(result.network_labels).tolist()) <= allowed
    agreement = agreement_dice(
        results["fp32"].network_labels, results["int8"].network_labels, max(allowed) + 1
    )
    assert 0.0 <= agreement["mean"] <= 1.0 and not math.isnan(agreement["mean"])
    print(
        f"{model_id} (reduced, random weights): INT8 kernels {kernels['int8']}/{kernels['int8'] + kernels['float']}, "
        f"INT8-vs-FP32 label agreement {agreement['mean']:.3f}, "
        f"logit SQNR {sqnr_db(engines['fp32'].run(windows[:1]), engines['int8'].run(windows[:1])):.1f} dB"
    )
