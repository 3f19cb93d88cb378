"""Does the INT8 accuracy guard's estimate hold on unseen subjects? Scanner variations as stand-ins.

With one calibration scan the guard can only validate on data calibration saw. Two studies, per model
and calibration scan (one shared MRI; the other shared MRI and the ICBM152 2009a template, from
nilearn's wheel, ``pip install medquantslicer-engine-tools[bench]``, are the unseen subjects); every
volume is preprocessed and head-cropped as segmentation does and runs whole, in one pass:

* ``estimates``: INT8 as the product quantizes it (NNCF, GPTQ weight codes, nothing kept), calibrated
  on the scan; agreement Dice with strict FP32 on the scan itself, on copies of it (contrast gamma 0.7
  and 1.4, a Gaussian blur of one voxel, a smooth bias field of +-15 %, noise of 0.03) and on the
  unseen subjects;
* ``guard``: the product's :class:`~engine_tools.guard.AccuracyGuard` at ``--target-dice`` validating
  on the scan plus its scanner variations (:mod:`engine_tools.scanner_variations`), and the agreement of
  what it chose on the unseen subjects.

    python bench/guard_variations.py prepare
    python bench/guard_variations.py estimates brainchop-model21_104class t1_crop > part1.jsonl
    python bench/guard_variations.py guard brainchop-model21_104class t1_crop --target-dice 0.98 > part2.jsonl
    python bench/guard_variations.py tables part*.jsonl --note "how it was run"

``tables`` writes ``bench/results/guard_variations.json`` and ``.md`` naming the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from e2e import MRI, volume_change_text
from int8_recipes import RESULTS, _onnx

VOLUMES = RESULTS / ".guard_volumes.npz"
SUBJECTS = {"t1_crop": MRI / "t1_crop.nii.gz", "mni152_2009_t1": MRI / "mni152_2009_t1.nii.gz"}


def bias_field(volume: np.ndarray, strength: float = 0.15) -> np.ndarray:
    """``volume`` times a smooth multiplicative field of about +-``strength``, clipped to [0, 1]."""
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in volume.shape[1:])
    field = 1 + strength * (0.6 * z[:, None, None] + 0.5 * y[None, :, None] ** 2 - 0.4 * x * z[:, None, None])
    return np.clip(volume * field[None], 0, 1).astype(np.float32)


def copies(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The scan and its variations, whole volumes."""
    from engine_tools.scanner_variations import VARIATIONS

    noise = np.random.default_rng(0).normal(0, 0.03, volume.shape).astype(np.float32)
    return {
        "calibration scan itself": volume,
        **{name: vary(volume) for name, vary in VARIATIONS.items()},
        "bias field 0.15": bias_field(volume),
        "noise 0.03": np.clip(volume + noise, 0, 1),
    }


def prepare() -> None:
    """Preprocess the three subjects as segmentation does (MeshNet card) and crop them to the head."""
    import tempfile

    from reference_dice import write_reference

    from engine_tools.registry import get_card
    from engine_tools.volumes import preprocess
    from engine_tools.whole_volume import plan_crop

    card = get_card("brainchop-model21_104class")
    paths = {**SUBJECTS, "icbm152_2009a": write_reference(Path(tempfile.mkdtemp()))[0]}
    arrays = {}
    for name, path in paths.items():
        array = preprocess(path, card).array
        arrays[name] = array[(slice(None), *plan_crop(card, array).slices)].astype(np.float32)
    np.savez_compressed(VOLUMES, **arrays)


def _agreement(adapter: Any, candidate: Any, volume: np.ndarray) -> dict[str, Any]:
    from engine_tools import accuracy
    from engine_tools.guard_measure import adapter_digests

    reference, test = (adapter_digests(adapter, model, [volume]) for model in (None, candidate))
    found = accuracy.json_ready(accuracy.digest_agreement(reference, test, min_voxels=1000))
    return {
        "dice": found["mean"],
        "worst": [found["worst"][0], round(found["worst"][1], 4)],
        "volume_change": found["volume_change"],
        "largest_volume_change": found["largest_volume_change"],
    }


def study(which: str, model_id: str, calibrated_on: str, target: float) -> None:
    import openvino as ov

    from engine_tools.engines.openvino.quantize import NNCFAdapter
    from engine_tools.guard import AccuracyGuard
    from engine_tools.progress import SilentProgress
    from engine_tools.scanner_variations import scanner_variations

    volumes = dict(np.load(VOLUMES))
    scan = volumes[calibrated_on]
    model = ov.Core().read_model(str(_onnx(model_id, None)))
    model.reshape({model.input(0): ov.PartialShape([1, 1, 64, 64, 64])})
    row = {"study": which, "model": model_id, "calibrated_on": calibrated_on}
    options = {"target_dice": target, "fully_convolutional": True}
    validation = [scan] + [copy for _, _, copy in scanner_variations([scan])]
    adapter = NNCFAdapter(model, [scan], options, validation)
    started = time.perf_counter()
    if which == "estimates":
        candidate = adapter.quantize([], adapter.recipe({}))
        measured = copies(scan)
    else:
        guard = AccuracyGuard(adapter, validation, [scan], options, SilentProgress())
        candidate, report = guard.run()
        kept = report.kept_in_higher_precision
        estimate = {
            "estimate": report.final_mean_dice,
            "kept": kept,
            "guard_s": round(time.perf_counter() - started),
            "volume_change": report.volume_change,
            "largest_volume_change": report.largest_volume_change,
        }
        print(json.dumps({**row, "case": "guard", **estimate}), flush=True)
        measured = {}
    measured.update({f"unseen {name}": v for name, v in volumes.items() if name != calibrated_on})
    for case, volume in measured.items():
        print(json.dumps({**row, "case": case, **_agreement(adapter, candidate, volume)}), flush=True)


def tables(parts: list[Path], note: str) -> None:
    from engine_tools.machine import machine_description

    rows = [
        json.loads(line) for part in parts for line in part.read_text().splitlines() if line.startswith("{")
    ]
    lines = [
        "# The guard's estimate against unseen subjects: scanner variations as stand-ins",
        "",
        f"Machine: {machine_description().get('cpu')}; {note}",
        "",
        "Agreement Dice with strict FP32 (mean over labels of at least 1000 voxels) on whole head-cropped "
        "volumes. `python bench/guard_variations.py` (its docstring says what each study does).",
        "",
        "## INT8 with nothing kept: agreement on the calibration scan, its copies and unseen subjects",
        "",
        "| model | calibrated on | case | Dice | worst label |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['calibrated_on']} | {r['case']} | {r['dice']} | {r['worst']} |"
        for r in rows
        if r["study"] == "estimates"
    ]
    lines += [
        "",
        "## The guard validating on the scan and its scanner variations, then unseen subjects",
        "",
        "| model | calibrated on | guard's estimate | kept | unseen subject | Dice |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["study"] == "guard" and r["case"] == "guard":
            for u in (u for u in rows if u["study"] == "guard" and u["case"].startswith("unseen")):
                if (u["model"], u["calibrated_on"]) == (r["model"], r["calibrated_on"]):
                    lines.append(
                        f"| {r['model']} | {r['calibrated_on']} | {r['estimate']:.4f} | {len(r['kept'])} | "
                        f"{u['case'][7:]} | {u['dice']} |"
                    )
    lines += volume_lines(rows)
    (RESULTS / "guard_variations.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "guard_variations.json").write_text(json.dumps({"note": note, "rows": rows}, indent=1) + "\n")


def volume_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: per guard run, the largest label volume change against FP32 on its validation samples
    and on each unseen subject, and how well the validation's per-label changes predict the unseen
    subject's (Pearson r over the labels scored in both)."""
    guards = [r for r in rows if r["study"] == "guard" and r["case"] == "guard" and "volume_change" in r]
    if not guards:
        return []
    lines = [
        "",
        "## Label volume change against FP32: the guard's validation against unseen subjects",
        "",
        "Voxels of each label in INT8's labels relative to FP32's, minus one (labels of at least 1000 "
        "voxels); r = correlation over labels of the validation's changes with the unseen subject's.",
        "",
        "| model | calibrated on | largest on validation | unseen subject | largest on unseen | r over labels |",
        "|---|---|---|---|---|---|",
    ]
    for r in guards:
        for u in rows:
            if u["study"] != "guard" or not u["case"].startswith("unseen") or "volume_change" not in u:
                continue
            if (u["model"], u["calibrated_on"]) != (r["model"], r["calibrated_on"]):
                continue
            common = sorted(set(r["volume_change"]) & set(u["volume_change"]))
            x = np.array([r["volume_change"][k] for k in common])
            y = np.array([u["volume_change"][k] for k in common])
            corr = float(np.corrcoef(x, y)[0, 1]) if len(common) > 2 and x.std() and y.std() else float("nan")
            lines.append(
                f"| {r['model']} | {r['calibrated_on']} | {volume_change_text(r['largest_volume_change'])} | "
                f"{u['case'][7:]} | {volume_change_text(u['largest_volume_change'])} | {corr:.2f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "estimates", "guard", "tables"))
    parser.add_argument("args", nargs="*", help="model and calibration subject; for tables: JSON-lines files")
    parser.add_argument("--target-dice", type=float, default=0.98)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare()
    elif args.step == "tables":
        tables([Path(p) for p in args.args], args.note)
    elif len(args.args) != 2:
        sys.exit("give a model id and the calibration subject (t1_crop or mni152_2009_t1)")
    else:
        study(args.step, args.args[0], args.args[1], args.target_dice)


if __name__ == "__main__":
    main()
