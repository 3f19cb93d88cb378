"""Run only: a cached engine segments with OpenVINO, numpy and SimpleITK, without importing PyTorch,
NNCF, ONNX, MONAI or nibabel; the numpy preprocessing that makes this possible equals MONAI's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import shared_path

from engine_tools import volumes
from engine_tools.geometry import orientation_code, ras_affine
from engine_tools.pipeline import prepare_engine
from engine_tools.registry import ModelCard, get_card

HEAVY = ("torch", "nncf", "onnx", "onnxruntime", "monai", "nibabel")
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

RUN = f"""
import json, sys
from engine_tools.cli import main
code = main(sys.argv[1:])
tops = {{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names)
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules], "tops": sorted(tops)}}))
"""


def run_only_modules() -> set[str]:
    """Top-level modules the run-only distributions may bring (openvino imports its telemetry and
    packaging), plus what Python and the editable install themselves put in ``sys.modules``."""
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["medquant"]["install"]["run-only"]
    return {*declared, "openvino_telemetry", "packaging", "engine_tools", "__main__", "__mp_main__"}


@pytest.mark.parametrize("scan", ["t1_crop.nii.gz", "mni152_2009_t1.nii.gz"])
def test_numpy_preprocessing_equals_monai(scan):
    image = sitk.ReadImage(str(shared_path("data", "mri", scan)))
    card = get_card("brainchop-model18cls")  # LIA, 1 mm, quantile 2..98 %, conform to 256^3
    fast = volumes.preprocess(image, card)
    with (
        mock.patch.object(volumes, "preprocess_without_monai", return_value=None),
        mock.patch.object(volumes, "preprocess_with_resampling", return_value=None),
        mock.patch.object(volumes, "already_conformed", return_value=False),
    ):
        reference = volumes.preprocess(image, card)
    np.testing.assert_array_equal(fast.array, reference.array)
    np.testing.assert_allclose(fast.affine, reference.affine, atol=1e-9)
    for step in ("input_orientation", "orientation", "intensity", "warnings"):
        assert fast.steps[step] == reference.steps[step]
    assert orientation_code(image) == "".join(nib.aff2axcodes(ras_affine(image)))


def test_resampling_cards_still_take_the_monai_path():
    image = sitk.ReadImage(str(shared_path("data", "mri", "mni152_2009_t1.nii.gz")))
    card = get_card("unet-btcv")  # 1.5 x 1.5 x 2 mm: needs resampling
    data = np.zeros((1, 2, 2, 2), np.float32)
    assert volumes.preprocess_without_monai(data, ras_affine(image), card.preprocessing, 1, {}) is None


def test_cached_engine_segments_without_torch_monai_nncf_onnx(tmp_path):
    raw = dict(get_card("brainchop-model11_gw_ae").raw)
    raw["preprocessing"] = {**raw["preprocessing"], "shape": None}
    raw["window"] = {**raw["window"], "size": [64, 64, 64]}
    card_file = tmp_path / "model11-native.json"
    card_file.write_text(json.dumps(raw))
    weights = shared_path("models", "brainchop")
    t1 = sitk.ReadImage(str(shared_path("data", "mri", "t1_crop.nii.gz")))
    scan = tmp_path / "t1_96.nii.gz"
    sitk.WriteImage(t1[80:176, 80:176, 80:176], str(scan))
    env = {**os.environ, "MEDQUANT_CACHE_DIR": str(tmp_path / "cache")}
    with mock.patch.dict(os.environ, env):
        prepare_engine(
            ModelCard.from_file(card_file), precision="fp32", backend="openvino", weights_dir=weights
        )
    env["PYTHONPATH"] = os.pathsep.join([str(Path(volumes.__file__).parents[1]), env.get("PYTHONPATH", "")])
    args = [
        "segment", str(card_file), "--backend", "openvino", "--precision", "fp32", "--weights-dir",
        str(weights), "--input", str(scan), "--output", str(tmp_path / "labels.nii.gz"), "--progress", "none",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], env=env, capture_output=True, text=True, timeout=300
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["heavy"] == [], done.stderr[-2000:]
    infrastructure = {m for m in result["tops"] if m.startswith(("_", "swig_runtime_data"))}
    assert set(result["tops"]) - infrastructure <= run_only_modules(), result["tops"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    assert labels.shape == (96, 96, 96) and set(np.unique(labels)) == {0, 1, 2}
    assert any((tmp_path / "cache" / "openvino-compiled").iterdir())  # compiled blobs cached
