"""CPU benchmark: FP32 (strict) / BF16 / INT8 of every real model on this machine.

For each model card with real published weights (brainchop MeshNets, deepbet, bring-your-own ONNX) it
prepares OpenVINO engines in strict FP32, BF16 and INT8 (NNCF, calibrated on another subject than the
measured scan, accuracy guard on) and ONNX Runtime FP32/INT8 (QDQ), times ``engine.run`` on one real
window (median after warm-up) and measures agreement of the INT8/BF16 logits' argmax with strict FP32
of the same backend on that window (Dice per label, mean, worst) and the logits SQNR; the measuring is
:func:`engine_tools.compare.measure_precisions`, the loop ``medquant compare`` runs.

    python bench/cpu_bench.py                      # all real models -> bench/results/cpu_models.{json,md}
    python bench/cpu_bench.py --smoke --output-dir /tmp/bench   # one small model, two precisions

Not part of CI beyond the smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine_tools import demo  # noqa: E402
from engine_tools.cache import atomic_file, cache_dir, write_json_atomic  # noqa: E402
from engine_tools.compare import Measurement, measure_precisions  # noqa: E402
from engine_tools.machine import machine_description, openvino_cpu_capabilities  # noqa: E402
from engine_tools.measure import centre_window  # noqa: E402
from engine_tools.progress import HumanProgress, Progress, SilentProgress  # noqa: E402
from engine_tools.spec import EngineSpec  # noqa: E402

#: Card id prefixes of models whose real pretrained weights are reachable here.
REAL_MODEL_PREFIXES = ("brainchop-", "deepbet", "niivue")
#: (backend, precision) rows measured for each model; the first is the reference.
ROWS = (
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
)
SMOKE_MODEL = "brainchop-model5_gw_ae"
SMOKE_ROWS = (("openvino", "fp32"), ("openvino", "int8"))
SCANS = {"MR": ("data", "mri", "t1_crop.nii.gz"), "CT": ("data", "ct", "example_ct.nii.gz")}
CALIBRATION = {"MR": ("data", "mri", "mni152_2009_t1.nii.gz"), "CT": ("data", "ct", "example_ct_sm.nii.gz")}


def real_model_cards(selected: list[str] | None = None) -> list[Any]:
    from engine_tools.registry import get_card, load_cards

    if selected:
        return [get_card(model) for model in selected]
    return [card for mid, card in sorted(load_cards().items()) if mid.startswith(REAL_MODEL_PREFIXES)]


def with_window(card: Any, size: int) -> Any:
    """A copy of ``card`` with ``size``^3 windows and no conform shape (its own id, so its own cache keys)."""
    from engine_tools.registry import ModelCard

    raw = dict(card.raw)
    raw["id"] = f"{card.id}-w{size}"
    raw["window"] = {**raw["window"], "size": [size, size, size]}
    raw["preprocessing"] = {**raw["preprocessing"], "shape": None}
    return ModelCard.from_dict(raw, card.path)


def calibration_folder(modality: str) -> Path:
    """A cache folder linking one scan of another subject than the measured one."""
    source = demo.shared_root().joinpath(*CALIBRATION.get(modality, CALIBRATION["MR"]))
    if not source.exists():
        raise FileNotFoundError(f"calibration scan {source} not found (set $MEDQUANT_SHARED)")
    folder = cache_dir(f"bench-calibration-{modality.lower()}")
    link = folder / source.name
    if not link.exists():
        link.symlink_to(source)
    return folder


def bench_model(
    card: Any,
    rows: tuple[tuple[str, str], ...],
    windows: int,
    warmup: int,
    repeats: int,
    weights_dir: str | None,
    progress: Progress,
    below_target: bool = False,
) -> dict[str, Any]:
    """All rows of one model, through compare's per-precision measuring (one backend at a time, no
    whole-volume segmentation); a row that cannot run records why instead of stopping the bench.
    ``below_target``: an INT8 build may end below the guard's target (reported as such) instead of
    escalating to a fully higher-precision engine."""
    from engine_tools.calibration import collect_windows
    from engine_tools.volumes import preprocess, read_image

    modality = card.modality.upper() if card.modality.upper() in SCANS else "MR"
    scan = demo.shared_root().joinpath(*SCANS[modality])
    batch = centre_window(
        np.asarray(preprocess(read_image(scan), card).array, dtype=np.float32), card.window_size
    )[None]
    calibration = None
    if any(precision == "int8" for _, precision in rows):
        # per-window latency is measured here, so INT8 is calibrated and guarded on windows too
        # (fully convolutional cards otherwise take one whole cropped volume per scan)
        calibration = collect_windows(
            calibration_folder(modality), card, num_windows=windows, progress=progress, whole_volume=False
        )
    result: dict[str, Any] = {
        "model": card.id,
        "title": card.title,
        "num_classes": card.num_classes,
        "window": list(batch.shape),
        "scan": str(scan),
        "calibration_windows": None if calibration is None else len(calibration),
        "rows": [],
    }
    measurement = Measurement(batch=batch, warmup=warmup, repeats=repeats)
    for backend in dict.fromkeys(backend for backend, _ in rows):
        precisions = [precision for b, precision in rows if b == backend]
        spec = EngineSpec(
            backend=backend, calibration=calibration, weights_dir=weights_dir, allow_below_target=below_target
        )
        progress.log(f"{card.id}: {backend} {', '.join(precisions)}")
        try:
            measured = measure_precisions(card, spec, precisions, measurement, progress)
        except Exception as exc:  # record and go on: one failing backend must not lose the others
            reason = f"{type(exc).__name__}: {exc}"[:500]
            measured = {p: {"precision": p, "status": "unavailable", "reason": reason} for p in precisions}
            progress.warning(f"{card.id} {backend}: {reason}")
        for precision in precisions:
            row = {"backend": backend, **measured[precision]}
            row.pop("engine", None)
            row.pop("files", None)
            if "sqnr_db_window" in row:
                row["sqnr_db"] = row.pop("sqnr_db_window")
            result["rows"].append(row)
        gc.collect()
    _add_ratios(result["rows"])
    return result


def _native(row: dict[str, Any], capabilities: list[str]) -> bool:
    """False for a BF16/FP16 OpenVINO row on a CPU without those kernels (OpenVINO ran it as FP32)."""
    if row["backend"] != "openvino" or row["precision"] not in ("bf16", "fp16") or not capabilities:
        return True
    return row["precision"].upper() in capabilities


def _add_ratios(rows: list[dict[str, Any]], capabilities: list[str] | None = None) -> None:
    capabilities = capabilities if capabilities is not None else openvino_cpu_capabilities()
    for row in rows:
        row.pop("speedup_vs_bf16", None)
        if row.get("status") == "ok" and not _native(row, capabilities):
            row["note"] = f"no native {row['precision'].upper()} on this CPU: OpenVINO ran FP32 kernels"
    ok = {(r["backend"], r["precision"]): r for r in rows if r.get("status") == "ok" and "note" not in r}
    base = ok.get(("openvino", "fp32"))
    for row in ok.values():
        same_fp32 = ok.get((row["backend"], "fp32"))
        if same_fp32:
            row["speedup_vs_fp32_same_backend"] = round(
                same_fp32["latency_ms_per_window"] / row["latency_ms_per_window"], 3
            )
            row["size_vs_fp32_same_backend"] = round(
                row["bytes_on_disk"] / max(same_fp32["bytes_on_disk"], 1), 3
            )
        if base:
            row["speedup_vs_openvino_fp32"] = round(
                base["latency_ms_per_window"] / row["latency_ms_per_window"], 3
            )
        bf16 = ok.get((row["backend"], "bf16"))
        if bf16 and row["precision"] == "int8":
            row["speedup_vs_bf16"] = round(bf16["latency_ms_per_window"] / row["latency_ms_per_window"], 3)


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    flags = ", ".join(f for f, on in machine["cpu_flags"].items() if on) or "none of interest"
    lines = [
        "# CPU benchmark: FP32 (strict) / BF16 / INT8 per model",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; CPU flags: {flags}; "
        f"OpenVINO CPU capabilities: {', '.join(machine['openvino_cpu_capabilities']) or 'n/a'}.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
        "",
        f"Latency: median of {report['settings']['repeats']} runs of `engine.run` on one real window (batch 1) "
        f"after {report['settings']['warmup']} warm-up run(s). Agreement: argmax of the logits on that window "
        "versus OpenVINO strict FP32 (Dice over labels present; worst label), logits SQNR (– = identical). INT8 calibrated on "
        "another subject than the measured scan, with the accuracy guard on (target mean Dice 0.97).",
        *(
            [f"**Run conditions:** {report['settings']['note']}", ""]
            if report["settings"].get("note")
            else []
        ),
        "Windows marked * are smaller than the card's (a copy of the card with that window and no conform "
        "shape; MeshNets are fully convolutional) to keep the whole run short on a small CPU.",
        "",
        "| model | window | backend | precision | size (MiB) | size vs FP32 | latency (ms) | speed-up vs FP32 "
        "| vs BF16 | mean Dice vs FP32 | worst | SQNR (dB) | layers kept | status |",
        "|" + "---|" * 14,
    ]
    for model in report["models"]:
        if "error" in model:
            lines.append(f"| {model['model']} | | | | | | | | | | | | | error: {model['error'][:120]} |")
            continue
        window = "x".join(str(s) for s in model["window"][2:]) + ("*" if model.get("window_override") else "")
        for row in model["rows"]:
            if row.get("status") != "ok":
                lines.append(
                    f"| {model['model']} | {window} | {row['backend']} | {row['precision']} "
                    f"| | | | | | | | | | unavailable: {row.get('reason', '')[:120]} |"
                )
                continue
            agreement = row.get("agreement_vs_fp32") or {}
            worst = (agreement.get("worst") or [None, None])[1]
            kept = row.get("kept_in_higher_precision")
            if row.get("note"):
                lines.append(
                    f"| {model['model']} | {window} | {row['backend']} | {row['precision']} "
                    f"| | | {row['latency_ms_per_window']:.1f} | | | | | | | {row['note']} |"
                )
                continue
            lines.append(
                f"| {model['model']} | {window} | {row['backend']} | {row['precision']} "
                f"| {row['bytes_on_disk'] / 2**20:.3f} | {_f(row.get('size_vs_fp32_same_backend'), '.2f')} "
                f"| {row['latency_ms_per_window']:.1f} | {_f(row.get('speedup_vs_fp32_same_backend'), '.2f')} "
                f"| {_f(row.get('speedup_vs_bf16'), '.2f')} | {_f(agreement.get('mean'), '.4f')} | {_f(worst, '.4f')} "
                f"| {_f(row.get('sqnr_db'), '.1f')} | {'' if kept is None else len(kept)} | ok |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="card ids (default: every model with real weights)")
    parser.add_argument("--output-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--name", default=None, help="file stem (default cpu_models, cpu_smoke with --smoke)")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--weights-dir", default=None, help="offline weights mirror (default ../shared)")
    parser.add_argument("--window", type=int, default=None, help="override the cards' window size (N^3)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_MODEL}, 64^3 windows, OpenVINO FP32+INT8, 1 repeat; INT8 may end below the guard target",
    )
    parser.add_argument("--append", action="store_true", help="add to the models already in the output JSON")
    parser.add_argument(
        "--note", default=None, help="a sentence on the run's conditions, shown in the markdown"
    )
    parser.add_argument("--render-only", action="store_true", help="re-render the markdown from the JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    progress: Progress = SilentProgress() if args.quiet else HumanProgress()
    rows = ROWS
    if args.smoke:
        args.models = args.models or [SMOKE_MODEL]
        rows, args.repeats, args.windows = SMOKE_ROWS, 1, min(args.windows, 4)
        args.window = args.window or 64
    weights_dir = args.weights_dir or (
        str(demo.default_weights_dir()) if demo.default_weights_dir() else None
    )
    report: dict[str, Any] = {
        "machine": machine_description(),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "calibration_windows": args.windows,
            "window_override": args.window,
            "note": args.note,
        },
        "models": [],
    }
    stem = args.name or ("cpu_smoke" if args.smoke else "cpu_models")
    out = Path(args.output_dir)
    if args.render_only:
        saved = json.loads((out / f"{stem}.json").read_text())
        if args.note:
            saved["settings"]["note"] = args.note
        caps = saved["machine"].get("openvino_cpu_capabilities", [])
        for model in saved["models"]:
            _add_ratios(model.get("rows", []), caps)
        write_json_atomic(out / f"{stem}.json", saved)
        with atomic_file(out / f"{stem}.md", "w") as stream:
            stream.write(render_markdown(saved))
        return 0
    if args.append and (out / f"{stem}.json").is_file():
        previous = json.loads((out / f"{stem}.json").read_text())
        report["models"] = previous.get("models", [])
    for card in real_model_cards(args.models):
        if args.window:
            card = with_window(card, args.window)
        started = time.perf_counter()
        try:
            model = bench_model(
                card, rows, args.windows, args.warmup, args.repeats, weights_dir, progress, args.smoke
            )
        except Exception as exc:
            model = {"model": card.id, "error": f"{type(exc).__name__}: {exc}"}
            progress.warning(f"{card.id}: {model['error']}")
        model["seconds"] = round(time.perf_counter() - started, 1)
        model["window_override"] = args.window
        report["models"].append(model)
        write_json_atomic(out / f"{stem}.json", report)  # keep partial results of a long run
        with atomic_file(out / f"{stem}.md", "w") as stream:
            stream.write(render_markdown(report))
    print(render_markdown(report))
    print(json.dumps({"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
