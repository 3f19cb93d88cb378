"""TorchCompiledEngine on the CPU (Inductor C++ kernels): a tiny real network, compiled for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_tools.engines.base import BuildRequest
from engine_tools.engines.torch_compiled_engine import SETTINGS_FILE, TorchCompiledEngine

ok, reason = TorchCompiledEngine.availability()
pytestmark = pytest.mark.skipif(not ok, reason=f"torch.compile unavailable: {reason}")


def _factory():  # noqa: ANN202 - returns a torch module
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=2, dilation=2), nn.ELU(), nn.Conv3d(4, 3, 1)).eval()


def test_compiled_engine_build_load_run_matches_eager(tmp_path: Path) -> None:
    import torch
    from monai.inferers import sliding_window_inference

    engine = TorchCompiledEngine("fp32", "cpu")
    request = BuildRequest("tiny", None, (8, 8, 8), 1, 3, torch_module_factory=_factory, options={"batch": 2})
    report = engine.build(request, tmp_path)
    assert (tmp_path / SETTINGS_FILE).is_file() and report["compile"]["mode"] == "default"
    assert report["compile_seconds"] > 0
    windows = np.random.default_rng(1).random((3, 1, 8, 8, 8), dtype=np.float32)  # 3: padded to 2+2
    with torch.inference_mode():
        expected = _factory()(torch.from_numpy(windows)).numpy()
    got = engine.run(windows)
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)

    reloaded = TorchCompiledEngine("fp32", "cpu")
    reloaded.attach_factory(_factory)
    reloaded.load(tmp_path)
    volume = torch.rand(1, 1, 12, 12, 12)
    with torch.inference_mode():
        logits = sliding_window_inference(volume, (8, 8, 8), 2, reloaded.predictor(), overlap=0.5)
        reference = sliding_window_inference(volume, (8, 8, 8), 2, _factory(), overlap=0.5)
    assert torch.allclose(logits, reference, atol=1e-5)
    described = reloaded.describe()
    assert described["backend"] == "torch-compiled" and described["bytes_on_disk"] > 0
    assert described["inductor_cache"]


def test_compiled_engine_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        TorchCompiledEngine("fp16", "cpu")
    with pytest.raises(ValueError, match="ONNX-only"):
        TorchCompiledEngine("fp32", "cpu").build(BuildRequest("x", None, (8, 8, 8), 1, 3), tmp_path)
    with pytest.raises(RuntimeError, match="attach_factory"):
        TorchCompiledEngine("fp32", "cpu").load(tmp_path)
