"""Cohort throughput: scans per hour for one model, FP32 vs INT8 in one process, and on Dask.

Builds a small cohort of real T1 scans (the shared brainchop T1, the MNI152 template, and the T1
mirrored left-right so it is a different file), then segments it with ``run_batch`` exactly as
``medquant segment --output-dir`` does:

1. one process, OpenVINO FP32 (the engine uses every core itself);
2. one process, OpenVINO INT8 (NNCF, calibrated on the brainchop T1, accuracy guard on);
3. the INT8 batch on a Dask ``LocalCluster`` of N single-threaded worker processes, each pinned to its
   own cores: cluster start-up, the workers' engine loads and the per-task overhead are reported.

Engine builds are timed apart from the batches (a batch reuses a cached engine). FP32 and INT8 labels
are compared per scan (mean Dice over the labels). Results: ``bench/results/batch_cpu.{json,md}``.

    python bench/batch.py                         # default model, 3 scans, Dask local:2
    python bench/batch.py --model brainchop-model5_gw_ae --workers 2 --note "..."
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine_tools import demo  # noqa: E402
from engine_tools.cache import atomic_file, write_json_atomic  # noqa: E402
from engine_tools.machine import machine_description  # noqa: E402
from engine_tools.progress import HumanProgress  # noqa: E402

SHARED = REPO.parent / "shared"


def make_cohort(folder: Path) -> list[Path]:
    """Three real T1 scans as separate subjects (BIDS-like names)."""
    import SimpleITK as sitk

    t1 = sitk.ReadImage(str(SHARED / "data" / "mri" / "t1_crop.nii.gz"))
    mni = sitk.ReadImage(str(SHARED / "data" / "mri" / "mni152_2009_t1.nii.gz"))
    mirrored = sitk.Flip(t1, [True, False, False])
    paths = []
    for name, image in (("sub-01", t1), ("sub-02", mni), ("sub-03", mirrored)):
        path = folder / name / "anat" / f"{name}_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths


def prepare(card: Any, precision: str, calibration: Path, progress: Any) -> tuple[Any, float]:
    from engine_tools.pipeline import prepare_engine

    started = time.perf_counter()
    from engine_tools.calibration import collect_windows

    engine = prepare_engine(
        card,
        backend="openvino",
        precision=precision,
        calibration=(
            collect_windows(calibration, card, card.calibration_windows, progress=progress)
            if precision == "int8"
            else None
        ),
        weights_dir=SHARED / "models" / "brainchop",
        progress=progress,
    )
    return engine, time.perf_counter() - started


def batch(engine: Any, card: Any, scans: list[Any], out: Path, progress: Any, client: Any = None, cores=None):
    from engine_tools.batch import engine_ref
    from engine_tools.batch_run import run_batch

    ref = engine_ref(engine, card, str(SHARED / "models" / "brainchop"))
    started = time.perf_counter()
    result = run_batch(engine, card, ref, scans, out, progress, client=client, cores_per_worker=cores)
    wall = time.perf_counter() - started
    assert result["counts"]["done"] == len(scans), result
    import json

    rows = json.loads((out / "manifest.json").read_text())["rows"]
    per_scan = [r["timings"]["total_s"] for r in rows]
    return {
        "scans": len(scans),
        "wall_s": round(wall, 2),
        "scans_per_hour": round(len(scans) / wall * 3600, 1),
        "mean_scan_s": round(float(np.mean(per_scan)), 2),
        "inference_s": [r["timings"]["inference_s"] for r in rows],
        "workers": sorted({r["worker"] for r in rows}),
        "modes": run_modes(out),
    }


def run_modes(out: Path) -> list[str]:
    """How the scans of a batch ran: ``whole_volume`` (one pass) or ``windows`` (sliding windows)."""
    import json

    rows = json.loads((out / "manifest.json").read_text())["rows"]
    return sorted({str(r["timings"].get("mode", "windows")) for r in rows})


def agreement(first: Path, second: Path, card: Any) -> list[float]:
    import SimpleITK as sitk

    from engine_tools.label_stats import dice_per_label

    values = [label.value for label in card.labels if label.value != 0]
    scores = []
    for path in sorted(first.rglob("*_T1w.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / path.relative_to(first))))
        found = [d for d in dice_per_label(a, b, values).values() if d is not None]
        scores.append(round(float(np.mean(found)), 4))
    return scores


def bit_equal(first: Path, second: Path) -> list[bool]:
    """Per scan: are the two batches' labelmaps identical voxel for voxel?"""
    import SimpleITK as sitk

    return [
        bool(
            np.array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                sitk.GetArrayFromImage(sitk.ReadImage(str(second / path.relative_to(first)))),
            )
        )
        for path in sorted(first.rglob("*_T1w.nii.gz"))
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from engine_tools.batch import collect_scans
    from engine_tools.cluster import dask_client
    from engine_tools.registry import get_card

    progress = HumanProgress()
    load_start = os.getloadavg()
    card = get_card(args.model)
    work = Path(tempfile.mkdtemp(prefix="medquant-batch-bench-"))
    os.environ.setdefault("MEDQUANT_CACHE_DIR", str(work / "cache"))
    inputs = make_cohort(work / "cohort")
    calibration = work / "calibration"
    calibration.mkdir()
    os.symlink(inputs[0], calibration / inputs[0].name)
    results: dict[str, Any] = {"model": card.id, "window": list(card.window_size), "runs": {}}
    outputs = {}
    for precision in ("fp32", "int8"):
        engine, build_s = prepare(card, precision, calibration, progress)
        scans, _ = collect_scans(work / "cohort", work / f"out-{precision}")
        outputs[precision] = work / f"out-{precision}"
        run_info = batch(engine, card, scans, outputs[precision], progress)
        results["runs"][f"one process {precision}"] = {"engine_prepare_s": round(build_s, 1), **run_info}
        if precision == "int8":
            int8_engine = engine
    results["fp32_vs_int8_mean_dice"] = agreement(outputs["fp32"], outputs["int8"], card)
    started = time.perf_counter()
    with dask_client(local=f"local:{args.workers}") as (client, cores):
        cluster_s = time.perf_counter() - started
        scans, _ = collect_scans(work / "cohort", work / "out-dask")
        run_info = batch(int8_engine, card, scans, work / "out-dask", progress, client=client, cores=cores)
    one_process = results["runs"]["one process int8"]
    results["runs"][f"dask local:{args.workers} int8"] = {
        **run_info,
        "cluster_start_s": round(cluster_s, 1),
        "cores_per_worker": cores,
        "wall_with_cluster_start_s": round(run_info["wall_s"] + cluster_s, 2),
        "overhead_vs_one_process_s": round(run_info["wall_s"] + cluster_s - one_process["wall_s"], 2),
    }
    results["dask_labels_equal_one_process"] = agreement(outputs["int8"], work / "out-dask", card)
    results["dask_labels_bit_equal"] = bit_equal(outputs["int8"], work / "out-dask")
    results["machine"] = machine_description()
    results["load_average"] = {
        "start": [round(x, 2) for x in load_start],
        "end": [round(x, 2) for x in os.getloadavg()],
    }
    results["note"] = args.note
    return results


def render(results: dict[str, Any]) -> str:
    machine = results["machine"]
    flags = ", ".join(f for f, on in machine["cpu_flags"].items() if on) or "none of interest"
    lines = [
        f"# Cohort throughput: {results['model']} (card window {'x'.join(map(str, results['window']))})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; CPU flags: {flags}.",
        f"Load average at start {results['load_average']['start']}, at end {results['load_average']['end']}.",
    ]
    busiest = max(results["load_average"]["start"] + results["load_average"]["end"])
    if busiest > 1.2 * machine["cores"]:
        lines += [
            "",
            f"**The cores were shared:** other jobs ran on this machine during the run (load average up to "
            f"{busiest} on {machine['cores']} cores), so every time here is longer than on an idle machine "
            "and the runs were not equally disturbed.",
        ]
    if results.get("note"):
        lines += ["", f"**Run conditions:** {results['note']}"]
    lines += [
        "",
        "| run | mode | scans | engine prepare (s) | batch wall (s) | scans/hour | mean s/scan | extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in sorted(results["runs"].items(), key=lambda item: ("dask" in item[0], item[0])):
        extra = ""
        if "cluster_start_s" in run:
            extra = (
                f"cluster start {run['cluster_start_s']} s, {run['cores_per_worker']} core(s)/worker, "
                f"overhead vs one process {run['overhead_vs_one_process_s']:+.1f} s"
            )
        lines.append(
            f"| {name} | {', '.join(run.get('modes', ['windows']))} | {run['scans']} | {run.get('engine_prepare_s', '–')} | {run['wall_s']} | "
            f"{run['scans_per_hour']} | {run['mean_scan_s']} | {extra} |"
        )
    lines += [
        "",
        f"INT8 vs FP32 labels, mean Dice per scan: {results['fp32_vs_int8_mean_dice']}.",
        f"Dask vs one-process INT8 labels, mean Dice per scan: {results['dask_labels_equal_one_process']}.",
        f"Dask vs one-process INT8 labelmaps identical voxel for voxel: {results.get('dask_labels_bit_equal')}.",
        "",
        "Engine prepare: export + (INT8) calibration, NNCF quantization and accuracy guard + compile; a "
        "batch reuses the cached engine. The Dask batch wall time includes each worker loading the engine "
        "on its first task; `mean s/scan` is the manifest's per-scan total (hash, read, preprocess, "
        "inference, resample, write).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=demo.DEFAULT_MODEL)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--note", default="")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "batch_cpu"))
    parser.add_argument("--render-only", metavar="JSON", help="re-render the markdown of an earlier run")
    args = parser.parse_args()
    if args.render_only:
        import json

        results = json.loads(Path(args.render_only).read_text())
        results["note"] = args.note or results.get("note", "")
        args.output = str(Path(args.render_only).with_suffix(""))
    else:
        results = run(args)
    write_json_atomic(Path(args.output + ".json"), results)
    with atomic_file(Path(args.output + ".md"), "w") as stream:
        stream.write(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
