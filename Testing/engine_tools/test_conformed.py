"""A scan already in the card's network space is preprocessed without PyTorch/MONAI, to the same array."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from shared_data import shared_path

import engine_tools.volumes as volumes
from engine_tools.registry import get_card
from engine_tools.volumes import preprocess, read_image


def test_conformed_t1_matches_the_monai_path_exactly(monkeypatch) -> None:
    image = read_image(shared_path("data", "mri", "t1_crop.nii.gz"))  # 256^3, 1 mm, LIA
    card = get_card("brainchop-model18cls")
    fast = preprocess(image, card)
    assert fast.steps.get("conformed_input") is True
    monkeypatch.setattr(volumes, "already_conformed", lambda *_: False)
    reference = preprocess(image, card)
    assert "conformed_input" not in reference.steps
    np.testing.assert_array_equal(fast.array, reference.array)
    np.testing.assert_allclose(fast.affine, reference.affine)
    assert fast.steps["intensity"] == reference.steps["intensity"]


def test_a_scan_needing_resampling_takes_the_monai_path() -> None:
    image = read_image(shared_path("data", "mri", "mni152_2009_t1.nii.gz"))  # RAS, 193x229x193
    prep = preprocess(image, get_card("brainchop-model18cls"))
    assert "conformed_input" not in prep.steps and prep.spatial_shape == (256, 256, 256)


def test_conformed_preprocessing_imports_neither_torch_nor_monai() -> None:
    code = (
        "import sys, json\n"
        "from engine_tools.volumes import preprocess\n"
        "from engine_tools.registry import get_card\n"
        f"preprocess({str(shared_path('data', 'mri', 't1_crop.nii.gz'))!r}, get_card('brainchop-model18cls'))\n"
        "print(json.dumps(sorted(m for m in ('torch', 'monai') if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
