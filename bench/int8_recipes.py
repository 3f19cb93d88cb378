"""Which INT8 recipe keeps a MeshNet closest to FP32 on an unseen subject (whole volumes, OpenVINO).

For each brainchop MeshNet and each direction (calibrate on one shared MRI, measure on the other) this
quantizes with NNCF through the product's own :class:`~engine_tools.engines.openvino.quantize.NNCFAdapter`
on ONE whole head-cropped volume, runs one pass over the other subject's head and scores agreement
Dice (mean over labels with >= 1000 voxels) and logits SQNR against strict FP32. Two studies:

* ``recipes``: calibration method, preset (asymmetric "mixed" vs symmetric "performance"
  activations), full vs fast bias correction, overflow fix, and keeping the first/last layer;
* ``layers``: each convolution alone kept in higher precision (is there one layer to blame?).

Two steps, so the study itself needs only numpy, OpenVINO and NNCF:

    python bench/int8_recipes.py prepare            # preprocess + crop both MRIs -> bench/results/.volumes.npz
    python bench/int8_recipes.py study --study recipes --models brainchop-model18cls

writes ``bench/results/int8_recipes_<study>.json`` and ``.md`` naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("MEDQUANT_BENCH_RESULTS", ROOT / "bench" / "results"))
VOLUMES = Path(os.environ.get("MEDQUANT_BENCH_VOLUMES", RESULTS / ".volumes.npz"))
SCANS = ("mni152_2009_t1", "t1_crop")
MODELS = ("brainchop-model18cls", "brainchop-model21_104class")

#: name -> (recipe changes, which convolutions to keep: indices into the ordered convolutions)
RECIPES: dict[str, tuple[dict[str, Any], list[int]]] = {
    "mixed, min/max, fast bias correction (default)": ({}, []),
    "mixed, full bias correction": ({"fast_bias_correction": False}, []),
    "mixed, percentile": ({"calibration_method": "percentile"}, []),
    "performance (symmetric activations)": ({"preset": "performance"}, []),
    "mixed, overflow fix": ({"overflow_fix": "enable"}, []),
    "mixed, keep first + last layer": ({}, [0, -1]),
    "mixed, keep last layer": ({}, [-1]),
}


def prepare(models: list[str], shared: Path) -> None:
    """Preprocess both MRIs as segmentation does and crop them to the head (largest receptive field)."""
    from engine_tools.registry import get_card
    from engine_tools.volumes import preprocess
    from engine_tools.whole_volume import plan_crop

    cards = [get_card(m) for m in models]
    card = max(cards, key=lambda c: int(c.network.get("receptive_field") or 0))
    arrays = {}
    for scan in SCANS:
        array = preprocess(shared / "data" / "mri" / f"{scan}.nii.gz", card).array
        arrays[scan] = array[(slice(None), *plan_crop(card, array).slices)].astype(np.float32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(VOLUMES, **arrays)


def _measure(adapter: Any, candidate: Any, volume: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    from engine_tools import accuracy

    times: list[float] = []
    logits = adapter.run(candidate, volume, timings=times)
    agreement = accuracy.json_ready(accuracy.logits_agreement(reference, logits, min_voxels=1000))
    return {
        "dice": agreement["mean"],
        "worst": agreement["worst"],
        "sqnr_db": agreement["sqnr_db"],
        "int8_s": round(times[0], 2),
    }


def study(models: list[str], which: str, onnx_dir: Path | None) -> list[dict[str, Any]]:
    """Every plan on every model and direction; the results are rewritten after each row."""
    import openvino as ov

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    volumes = {k: v[None] for k, v in np.load(VOLUMES).items()}
    rows: list[dict[str, Any]] = []
    for model_id in models:
        onnx = _onnx(model_id, onnx_dir)
        model = ov.Core().read_model(onnx)
        model.reshape({model.input(0): ov.PartialShape([1, 1, -1, -1, -1])})
        for calibrated_on, measured_on in (SCANS, SCANS[::-1]):
            adapter = NNCFAdapter(model, volumes[calibrated_on], {"int8_fallback": "bf16"})
            layers = adapter.layers()
            fp32_times: list[float] = []
            reference = adapter.run(None, volumes[measured_on], timings=fp32_times)
            plans = (
                [(name, *RECIPES[name]) for name in RECIPES]
                if which == "recipes"
                else [("none kept", {}, [])] + [(f"keep {i}: {n}", {}, [i]) for i, n in enumerate(layers)]
            )
            for label, changes, kept in plans:
                recipe = {**adapter.recipe({}), **changes}
                started = time.perf_counter()
                candidate = adapter.quantize([layers[i] for i in kept], recipe)
                row = {
                    "model": model_id,
                    "calibrated_on": calibrated_on,
                    "measured_on": measured_on,
                    "plan": label,
                    "kept_layers": [layers[i] for i in kept],
                    "quantize_s": round(time.perf_counter() - started, 1),
                    "fp32_s": round(fp32_times[0], 2),
                    **_measure(adapter, candidate, volumes[measured_on], reference),
                }
                rows.append(row)
                write(rows, which)
                print(json.dumps(row), flush=True)
    return rows


def _onnx(model_id: str, onnx_dir: Path | None) -> Path:
    if onnx_dir is not None:
        return onnx_dir / f"{model_id}.onnx"
    from engine_tools import networks
    from engine_tools.registry import get_card

    return Path(networks.export_onnx(get_card(model_id)))


def write(rows: list[dict[str, Any]], which: str) -> None:
    from engine_tools.machine import machine_description

    machine = machine_description()
    data = {"machine": machine, "study": which, "rows": rows}
    (RESULTS / f"int8_recipes_{which}.json").write_text(json.dumps(data, indent=1, default=str))
    lines = [
        f"# INT8 {which} study: whole head, unseen subject (OpenVINO + NNCF)",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('logical_cpus')} cores, "
        f"{', '.join(k for k, v in machine.get('cpu_flags', {}).items() if v)}. "
        f"`python bench/int8_recipes.py study --study {which}`.",
        "Calibration: one whole head-cropped volume; agreement Dice with strict FP32 over the other "
        "subject's head (mean over labels with >= 1000 voxels); layers kept in BF16.",
        "",
        "| model | calibrated on | plan | Dice | worst label (Dice) | SQNR dB | INT8 pass s | FP32 pass s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['calibrated_on']} | {r['plan']} | {r['dice']:.4f} | "
            f"{r['worst'][0]} ({r['worst'][1]:.3f}) | {r['sqnr_db']:.1f} | {r['int8_s']} | {r['fp32_s']} |"
        )
    (RESULTS / f"int8_recipes_{which}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "study"))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated card ids")
    parser.add_argument("--study", choices=("recipes", "layers"), default="recipes")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    parser.add_argument("--onnx-dir", type=Path, help="folder of <card id>.onnx exports (default: export)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.step == "prepare":
        prepare(models, args.shared)
    else:
        study(models, args.study, args.onnx_dir)


if __name__ == "__main__":
    main()
