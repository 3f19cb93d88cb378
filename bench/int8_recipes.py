"""Which INT8 recipe keeps a MeshNet closest to FP32 on an unseen subject (whole volumes, OpenVINO).

For each brainchop MeshNet and each direction (calibrate on one shared MRI, measure on the other) this
quantizes with NNCF through the product's own :class:`~engine_tools.engines.openvino.quantize.NNCFAdapter`
on ONE whole head-cropped volume, runs one pass over the other subject's head and scores agreement
Dice (mean over labels with >= 1000 voxels) and logits SQNR against strict FP32. Two studies:

* ``recipes``: calibration method, preset (asymmetric "mixed" vs symmetric "performance"
  activations), full vs fast bias correction, overflow fix, and keeping the first/last layer;
* ``layers``: each convolution alone kept in higher precision (is there one layer to blame?).

The recipe plans also cover SmoothQuant on the convolutions (alpha sweep), bias correction applied to
every layer, asymmetric weights, and calibration on intensity-augmented copies of the one volume
(gamma 0.7 / 1.4, Gaussian noise) with global or mean-of-samples min/max ranges. ``--plans``,
``--direction`` and ``--output`` split one study over several processes (each pinned to its own
cores, e.g. with ``taskset``); ``merge`` appends their rows to the study's results as one more run.

Two steps, so the study itself needs only numpy, OpenVINO and NNCF:

    python bench/int8_recipes.py prepare            # preprocess + crop both MRIs -> bench/results/.volumes.npz
    python bench/int8_recipes.py study --study recipes --models brainchop-model18cls
    python bench/int8_recipes.py study --models brainchop-model18cls --direction 0 --plans "smooth quant 0.15" \
        --output /tmp/part0.json
    python bench/int8_recipes.py merge /tmp/part0.json /tmp/part1.json --note "how it was run"

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

#: the calibration volume plus intensity-augmented copies (``"augment": True`` in a plan's changes)
AUGMENTATIONS = ("gamma 0.7", "gamma 1.4", "noise 0.02")

#: name -> (recipe changes, which convolutions to keep: indices into the ordered convolutions)
RECIPES: dict[str, tuple[dict[str, Any], list[int]]] = {
    "mixed, min/max, fast bias correction (default)": ({"smooth_quant_alpha": None}, []),
    "mixed, full bias correction": ({"fast_bias_correction": False}, []),
    "mixed, percentile": ({"calibration_method": "percentile"}, []),
    "performance (symmetric activations)": ({"preset": "performance"}, []),
    "mixed, overflow fix": ({"overflow_fix": "enable"}, []),
    "mixed, keep first + last layer": ({}, [0, -1]),
    "mixed, keep last layer": ({}, [-1]),
    "smooth quant 0.15": ({"smooth_quant_alpha": 0.15}, []),
    "smooth quant 0.3": ({"smooth_quant_alpha": 0.3}, []),
    "smooth quant 0.5": ({"smooth_quant_alpha": 0.5}, []),
    "smooth quant 0.7": ({"smooth_quant_alpha": 0.7}, []),
    "smooth quant 0.15, keep first + last layer": ({"smooth_quant_alpha": 0.15}, [0, -1]),
    "bias correction on every layer": ({"bias_correction_threshold": 1e9}, []),
    "asymmetric weights": ({"weights_mode": "asymmetric"}, []),
    "augmented calibration (4 samples), min/max": ({"augment": True}, []),
    "augmented calibration (4 samples), mean min/max": (
        {"augment": True, "calibration_method": "mean_minmax"},
        [],
    ),
    "augmented calibration, min/max, smooth quant 0.15": ({"augment": True, "smooth_quant_alpha": 0.15}, []),
}


def augmented(volume: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """``volume`` (intensities in [0, 1]) and one copy per :data:`AUGMENTATIONS` entry."""
    noise = np.random.default_rng(seed).normal(0.0, 0.02, volume.shape).astype(np.float32)
    copies = [np.power(volume, 0.7), np.power(volume, 1.4), np.clip(volume + noise, 0.0, 1.0)]
    return [volume, *(c.astype(np.float32) for c in copies)]


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


def study(
    models: list[str],
    which: str,
    onnx_dir: Path | None,
    plans: list[str] | None = None,
    directions: tuple[int, ...] = (0, 1),
    output: Path | None = None,
    deadline_s: float | None = None,
) -> list[dict[str, Any]]:
    """The chosen plans on every model and direction; the results are rewritten after each row.
    No plan starts once ``deadline_s`` seconds have passed."""
    import openvino as ov

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    began = time.perf_counter()
    volumes = {k: v[None] for k, v in np.load(VOLUMES).items()}
    rows: list[dict[str, Any]] = []
    for model_id in models:
        onnx = _onnx(model_id, onnx_dir)
        model = ov.Core().read_model(onnx)
        window = [d.get_length() for d in model.input(0).get_partial_shape()[2:]]
        model.reshape({model.input(0): ov.PartialShape([1, 1, *window])})  # the adapter makes it dynamic
        for direction in directions:
            calibrated_on, measured_on = (SCANS, SCANS[::-1])[direction]
            adapter = NNCFAdapter(model, volumes[calibrated_on], {"int8_fallback": "bf16"})
            layers = adapter.layers()
            fp32_times: list[float] = []
            reference = adapter.run(None, volumes[measured_on], timings=fp32_times)
            for label, changes, kept in _plans(which, layers, plans):
                if deadline_s is not None and time.perf_counter() - began > deadline_s:
                    return rows
                changes = dict(changes)
                chosen = adapter
                if changes.pop("augment", False):
                    samples = augmented(volumes[calibrated_on][0])
                    chosen = NNCFAdapter(model, samples, {"int8_fallback": "bf16"})
                recipe = {**adapter.recipe({}), **changes}
                started = time.perf_counter()
                candidate = chosen.quantize([layers[i] for i in kept], recipe)
                row = {
                    "model": model_id,
                    "calibrated_on": calibrated_on,
                    "measured_on": measured_on,
                    "plan": label,
                    "recipe": recipe,
                    "calibration_samples": len(chosen.calibration),
                    "kept_layers": [layers[i] for i in kept],
                    "quantize_s": round(time.perf_counter() - started, 1),
                    "fp32_s": round(fp32_times[0], 2),
                    **_measure(adapter, candidate, volumes[measured_on], reference),
                }
                rows.append(row)
                if output is not None:
                    output.write_text(json.dumps(rows, indent=1, default=str))
                else:
                    write(rows, which)
                print(json.dumps(row, default=str), flush=True)
    return rows


def _plans(
    which: str, layers: list[str], names: list[str] | None
) -> list[tuple[str, dict[str, Any], list[int]]]:
    if which == "layers":
        return [("none kept", {}, [])] + [(f"keep {i}: {n}", {}, [i]) for i, n in enumerate(layers)]
    unknown = sorted(set(names or []) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown plans {unknown}; known: {list(RECIPES)}")
    return [(name, *RECIPES[name]) for name in (names or RECIPES)]


def merge(parts: list[Path], which: str, note: str) -> None:
    """Append the rows of ``parts`` (``study --output`` files) to the study's results as one more run."""
    from engine_tools.machine import machine_description

    path = RESULTS / f"int8_recipes_{which}.json"
    data = json.loads(path.read_text()) if path.exists() else {"study": which, "runs": []}
    if "runs" not in data:  # results of a single run
        data = {"study": which, "runs": [{"machine": data["machine"], "note": "", "rows": data["rows"]}]}
    rows = [row for part in parts for row in json.loads(part.read_text())]
    # run merge on the machine that ran the study: the run is described by where merge runs
    data["runs"].append({"machine": machine_description(), "note": note, "rows": rows})
    path.write_text(json.dumps(data, indent=1, default=str))
    (RESULTS / f"int8_recipes_{which}_tables.md").write_text(tables(data["runs"]))


def tables(runs: list[dict[str, Any]]) -> str:
    """One markdown table per run (the study's markdown adds what they say)."""
    lines: list[str] = []
    for number, run in enumerate(runs, 1):
        machine = run["machine"]
        lines += [
            f"### Run {number}: {machine.get('cpu')}, {machine.get('logical_cpus')} cores"
            + (f"; {run['note']}" if run.get("note") else ""),
            "",
            "| model | calibrated on | plan | Dice | worst label (Dice) | SQNR dB | quantize s | INT8 pass s "
            "| FP32 pass s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["rows"]:
            lines.append(
                f"| {r['model']} | {r['calibrated_on']} | {r['plan']} | {r['dice']:.4f} | "
                f"{r['worst'][0]} ({r['worst'][1]:.3f}) | {r['sqnr_db']:.1f} | {r['quantize_s']} | "
                f"{r['int8_s']} | {r['fp32_s']} |"
            )
        lines.append("")
    return "\n".join(lines)


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
    parser.add_argument("step", choices=("prepare", "study", "merge"))
    parser.add_argument("parts", nargs="*", type=Path, help="merge: the study --output files")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated card ids")
    parser.add_argument("--study", choices=("recipes", "layers"), default="recipes")
    parser.add_argument("--plans", help="recipes study: plan names separated by ';' (default: all)")
    parser.add_argument("--direction", type=int, choices=(0, 1), help="0: calibrate on the first scan")
    parser.add_argument("--output", type=Path, help="write this process's rows here (see merge)")
    parser.add_argument("--deadline-s", type=float, help="start no plan after this many seconds")
    parser.add_argument("--note", default="", help="merge: how the run was made")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    parser.add_argument("--onnx-dir", type=Path, help="folder of <card id>.onnx exports (default: export)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.step == "prepare":
        prepare(models, args.shared)
    elif args.step == "merge":
        merge(args.parts, args.study, args.note)
    else:
        plans = [p.strip() for p in args.plans.split(";") if p.strip()] if args.plans else None
        directions = (0, 1) if args.direction is None else (args.direction,)
        study(models, args.study, args.onnx_dir, plans, directions, args.output, args.deadline_s)


if __name__ == "__main__":
    main()
