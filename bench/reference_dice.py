"""Dice against a tissue reference on a third, unseen subject: does INT8 keep FP32's Dice?

The target: |Dice(INT8 labels, reference) - Dice(FP32 labels, reference)| <= 0.005 wherever a
reference exists. Neither shared MRI has reference labels, so the subject here is the ICBM152 2009a
symmetric template shipped in nilearn's wheel (``pip install medquantslicer-engine-tools[bench]``):
a 1 mm, RAS, skull-stripped (brain only) T1 that no calibration saw, with grey- and white-matter
probability maps on the same grid. The reference tissue label of a voxel is the argmax of
(background = max(1 - gm - wm, 0), gm, wm), ties to the lower class: 0 background, 1 grey matter,
2 white matter. These are automatic template tissue maps, not manual labels.

For each model: ``medquant build`` + ``medquant segment`` (OpenVINO) of the template in FP32 and in
INT8 calibrated on each shared MRI separately (one scan per calibration folder), each in a fresh
process as bench/e2e.py runs them. The model's labels become tissues by their names
(:func:`tissue_of`); Dice per tissue (GM, WM) and their mean against the reference, INT8 - FP32,
the agreement of INT8 with FP32 labels and the INT8 guard's report are recorded.

    python bench/reference_dice.py --models brainchop-model11_gw_ae

writes ``bench/results/reference_dice_cpu.json`` and ``.md`` (models measured before are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import e2e
import numpy as np
import SimpleITK as sitk
from e2e import MRI, RESULTS, SCANS, agreement, engine_args, medquant

MODELS = ("brainchop-model11_gw_ae", "brainchop-model18cls", "brainchop-model21_104class")
TISSUES = ("GM", "WM")
REFERENCE_VALUES = {"GM": 1, "WM": 2}
TOLERANCE = 0.005
#: deep grey nuclei of FreeSurfer-style label names (lower case), counted as grey matter
GREY_NUCLEI = ("thalamus", "caudate", "putamen", "pallidum", "hippocampus", "amygdala", "accumbens")


def tissue_of(name: str) -> str:
    """Tissue class ("GM", "WM" or "other") of a model's label name.

    WM: names with "white matter" (cerebral and cerebellar) and the corpus callosum (``CC_*``, cut out
    of the cerebral white matter in FreeSurfer's aseg). GM: "grey/gray matter", cortex (``ctx-*``,
    "Cerebral-Cortex", "Cerebellum-Cortex": the template's GM map covers the cerebellar cortex) and the
    deep grey nuclei (thalamus, caudate, putamen, pallidum, hippocampus, amygdala, accumbens), which
    the template's GM map also covers. Everything else is "other": background, CSF, ventricles,
    brain stem and ventral diencephalon (both mixed grey and white matter).
    """
    lowered = name.lower().replace(" ", "-").replace("_", "-")
    if "white-matter" in lowered or lowered.startswith("cc-"):
        return "WM"
    grey = ("grey-matter", "gray-matter", "cortex")
    if lowered.startswith("ctx-") or any(word in lowered for word in grey + GREY_NUCLEI):
        return "GM"
    return "other"


def write_reference(folder: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The nilearn template T1 and its reference tissue labels as NIfTI files in ``folder``."""
    import nibabel as nib
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)  # each map divided by its maximum (0..1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float64)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float64)
    assert gm.shape == wm.shape == t1.shape, (gm.shape, wm.shape, t1.shape)
    background = np.clip(1.0 - gm - wm, 0.0, None)
    tissue = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    image_path, reference_path = folder / "icbm152_2009a_t1.nii.gz", folder / "icbm152_2009a_tissue.nii.gz"
    for path, data in ((image_path, np.round(np.asarray(t1.dataobj) * 255)), (reference_path, tissue)):
        image = nib.Nifti1Image(data.astype(np.uint8), t1.affine, t1.header)
        image.set_data_dtype(np.uint8)
        nib.save(image, str(path))
    counts = np.bincount(tissue.ravel(), minlength=3)
    about = {
        "source": f"nilearn {_version('nilearn')}: ICBM152 2009a symmetric template (1 mm), "
        "mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz",
        "rule": "argmax of (background = max(1 - gm - wm, 0), gm, wm), ties to the lower class",
        "shape": list(t1.shape),
        "axes": "".join(nib.aff2axcodes(t1.affine)),
        "voxels": {"background": int(counts[0]), "GM": int(counts[1]), "WM": int(counts[2])},
    }
    return image_path, reference_path, about


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def on_reference_grid(labels_path: Path, reference: sitk.Image) -> tuple[np.ndarray, str]:
    """The labelmap's array on the reference grid (nearest neighbour where the grids differ)."""
    from engine_tools.label_stats import reference_on_grid

    moved, warning = reference_on_grid(sitk.ReadImage(str(labels_path)), reference)
    grid = (
        "output resampled to the reference grid (nearest neighbour)"
        if warning
        else "output on the reference grid"
    )
    return sitk.GetArrayFromImage(moved), grid


def tissue_dice(labels: np.ndarray, tissue_lut: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice of each tissue (labels mapped through ``tissue_lut``) with the reference, and their mean."""
    mapped = tissue_lut[labels]
    found: dict[str, float] = {}
    for tissue in TISSUES:
        ours, theirs = mapped == REFERENCE_VALUES[tissue], reference == REFERENCE_VALUES[tissue]
        total = int(ours.sum()) + int(theirs.sum())
        found[tissue] = 2.0 * int(np.logical_and(ours, theirs).sum()) / total if total else float("nan")
    found["mean"] = float(np.mean([found[t] for t in TISSUES]))
    return found


def tissue_voxels(labels: np.ndarray, tissue_lut: np.ndarray) -> dict[str, int]:
    """Voxels of each tissue in ``labels`` (mapped through ``tissue_lut``)."""
    counts = np.bincount(tissue_lut[labels].ravel(), minlength=max(REFERENCE_VALUES.values()) + 1)
    return {tissue: int(counts[value]) for tissue, value in REFERENCE_VALUES.items()}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 5) for key, value in values.items()}


def measure_model(
    model: str, image: Path, reference_image: sitk.Image, cache: Path, out: Path
) -> dict[str, Any]:
    """FP32 and INT8 (calibrated on each shared MRI) labels of the template, scored against it."""
    reference = sitk.GetArrayFromImage(reference_image)
    row: dict[str, Any] = {"model": model, "int8": {}}
    fp32: dict[str, float] = {}
    labels_fp32: np.ndarray | None = None
    for precision, scan in [("fp32", None), *(("int8", s) for s in SCANS)]:
        calibration = None
        if scan is not None:
            calibration = out / f"calibration_{scan}"
            calibration.mkdir(exist_ok=True)
            if not (calibration / scan).exists():
                (calibration / scan).symlink_to(MRI / scan)
        base = engine_args(model, precision, "openvino", calibration)
        # one engine cache per calibration scan: each INT8 build is its own, never the other's cached one
        engines = cache / (precision if scan is None else f"int8_{scan.split('.')[0]}")
        built, build_wall, _ = medquant(["build", *base], engines)
        target = out / f"{model}_{precision if scan is None else 'int8_' + scan.split('.')[0]}.nii.gz"
        medquant(["segment", *base, "--input", str(image), "--output", str(target), "--overwrite"], engines)
        table = json.loads(target.with_name(target.name[: -len(".nii.gz")] + ".labels.json").read_text())
        names = {int(entry["value"]): entry["name"] for entry in table["labels"]}
        lut = np.zeros(max(names) + 1, dtype=np.uint8)
        for value, name in names.items():
            lut[value] = REFERENCE_VALUES.get(tissue_of(name), 0)
        labels, grid = on_reference_grid(target, reference_image)
        dice = tissue_dice(labels, lut, reference)
        voxels = tissue_voxels(labels, lut)
        if scan is None:
            fp32, labels_fp32, voxels_fp32 = dice, labels, voxels
            row["tissue_map"] = {str(v): [n, tissue_of(n)] for v, n in sorted(names.items())}
            row["grid"] = grid
            row["fp32"] = {"dice": _rounded(dice), "tissue_voxels": voxels, "build_wall_s": build_wall}
            print(json.dumps({model: {"fp32": row["fp32"]["dice"], "grid": grid}}), flush=True)
            continue
        report = built.get("build_report") or {}
        guard = report.get("accuracy_guard") or {}
        difference = {k: dice[k] - fp32[k] for k in (*TISSUES, "mean")}
        row["int8"][scan] = {
            "dice": _rounded(dice),
            "difference_vs_fp32": _rounded(difference),
            "within_tolerance": all(abs(v) <= TOLERANCE for v in difference.values()),
            "agreement_vs_fp32": agreement(labels_fp32, labels),
            "tissue_voxels": voxels,
            # INT8's voxels of each tissue relative to FP32's, minus one: a shift at the tissue border
            "tissue_volume_change": _rounded({t: voxels[t] / voxels_fp32[t] - 1.0 for t in TISSUES}),
            "guard_largest_volume_change": guard.get("largest_volume_change"),
            "kept_in_higher_precision": report.get("kept_in_higher_precision"),
            "guard_final_mean_dice": guard.get("final_mean_dice"),
            "guard_target": guard.get("target"),
            "build_wall_s": build_wall,
            "build_stage_seconds": report.get("stage_seconds"),
            "grid": grid,
        }
        print(json.dumps({model: {f"int8 calibrated on {scan}": row["int8"][scan]}}, default=str), flush=True)
    return row


def markdown(report: dict[str, Any]) -> str:
    machine, reference = report["machine"], report["reference"]
    lines = [
        "# INT8 versus FP32 Dice against a tissue reference (CPU, OpenVINO)",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores. "
        f"INT8 guard target: {report['int8_target_dice']}.",
        "",
        f"Subject: {reference['source']} ({'x'.join(map(str, reference['shape']))}, "
        f"{reference['axes']}). A skull-stripped (brain only) T1 is the input: a third subject that "
        "neither shared MRI's calibration saw. Reference: the template's own grey- and white-matter "
        "probability maps, automatic tissue maps, not manual labels; each voxel's class is the "
        f"{reference['rule']} (voxels: {reference['voxels']}).",
        "",
        f"Dice per tissue of each run's labels (mapped to tissues by name, below) with the reference; "
        f"target: |INT8 - FP32| <= {report['tolerance']} for GM, WM and their mean (positive: INT8 nearer "
        "the reference than FP32). INT8 is calibrated on "
        "one shared MRI at a time. Agreement = mean (worst) Dice of INT8 with FP32 labels over labels "
        "present; GM / WM volume vs FP32 = INT8's voxels of the tissue relative to FP32's (+: INT8 labels "
        "more of it); guard = the build's accuracy guard estimate on its own validation.",
        "",
        "Absolute Dice is bounded by the input, not by the precision: the networks take a whole conformed "
        "head (as the brainchop sample), and on this brain-only T1 model11 in FP32 labels much of the "
        "outermost cortex, which borders the zeroed skull, background. What the target compares is INT8 "
        "with FP32 on the same input.",
        "",
        "| model | run | Dice GM | Dice WM | mean | INT8 - FP32 (GM / WM / mean) | within | "
        "agreement vs FP32 | GM / WM volume vs FP32 | guard | kept in higher precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["models"]:
        dice = row["fp32"]["dice"]
        lines.append(
            f"| {row['model']} | FP32 | {dice['GM']} | {dice['WM']} | {dice['mean']} | | | | | | |"
        )
        for scan, int8 in row["int8"].items():
            dice, diff, agree = int8["dice"], int8["difference_vs_fp32"], int8["agreement_vs_fp32"]
            change = int8.get("tissue_volume_change")
            volumes = f"{change['GM']:+.2%} / {change['WM']:+.2%}" if change else ""
            lines.append(
                f"| {row['model']} | INT8 (calibrated on {scan}) | {dice['GM']} | {dice['WM']} | "
                f"{dice['mean']} | {diff['GM']:+.5f} / {diff['WM']:+.5f} / {diff['mean']:+.5f} | "
                f"{'yes' if int8['within_tolerance'] else 'no'} | {agree['mean']} ({agree['worst']}) | "
                f"{volumes} | {int8['guard_final_mean_dice']} | {len(int8['kept_in_higher_precision'] or [])} |"
            )
    lines += [
        "",
        "## Labels to tissues",
        "",
        "By name (`tissue_of` in `bench/reference_dice.py`): *white matter* names and the corpus callosum "
        "(`CC_*`) are WM; cortex (`ctx-*`, cerebral and cerebellar) and the deep grey nuclei (thalamus, "
        "caudate, putamen, pallidum, hippocampus, amygdala, accumbens) are GM; the rest (background, CSF, "
        "ventricles, brain stem, ventral diencephalon) is other. The template's maps are intensity "
        "based: they call much of the pallidum white matter and split the brain stem between both.",
        "",
    ]
    for row in report["models"]:
        groups: dict[str, list[str]] = {"GM": [], "WM": [], "other": []}
        for value, (name, tissue) in row["tissue_map"].items():
            groups[tissue].append(f"{value} {name}")
        lines.append(f"- {row['model']} ({row['grid']}):")
        lines += [f"  - {tissue}: {', '.join(names) or 'none'}" for tissue, names in groups.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--target-dice", type=float, default=None, help="the INT8 guard's target")
    parser.add_argument("--cache", default=None, help="engine cache to use (default: a fresh one)")
    parser.add_argument("--workdir", default=None, help="folder for volumes and labelmaps (default: new)")
    parser.add_argument("--output", default=str(RESULTS / "reference_dice_cpu"))
    args = parser.parse_args()
    e2e.TARGET_DICE = args.target_dice
    from engine_tools.machine import machine_description

    cache = Path(args.cache or tempfile.mkdtemp(prefix="medquant-refdice-cache-"))
    out = Path(args.workdir or tempfile.mkdtemp(prefix="medquant-refdice-"))
    out.mkdir(parents=True, exist_ok=True)
    image, reference_path, about = write_reference(out)
    reference_image = sitk.ReadImage(str(reference_path))
    target = Path(args.output)
    previous = (
        json.loads(target.with_suffix(".json").read_text()) if target.with_suffix(".json").exists() else {}
    )
    rows = {row["model"]: row for row in previous.get("models", [])}
    for model in args.models:
        rows[model] = measure_model(model, image, reference_image, cache, out)
        report = {
            "machine": {**machine_description(), "cores": os.cpu_count()},
            "int8_target_dice": args.target_dice or "the product's default",
            "tolerance": TOLERANCE,
            "reference": about,
            "models": list(rows.values()),
        }
        e2e.write_report(target, report, markdown)  # after every model: a failure keeps the rest
    print(target.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
