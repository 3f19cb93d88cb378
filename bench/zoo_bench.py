"""CPU benchmark of the eight seed networks at their full published size (OpenVINO FP32 / BF16 / INT8).

Published weights are not reachable from the build machines, so every network has random (seeded)
weights: latency and engine size do not depend on the weight values, accuracy does (not measured here).
Per model: export the card's FP32 ONNX (one window, dynamic batch), build OpenVINO engines with a strict
FP32 hint, a BF16 hint and NNCF INT8 (MinMax, calibration windows cut from the real CT/MRI in ../shared
after the card's preprocessing), and time one window (median after warm-up). Output:
``bench/results/zoo_cpu.json`` and ``zoo_cpu.md``, next to the MedPTQ paper's TensorRT table.

    python bench/zoo_bench.py [--models unet-btcv ...] [--repeats 3] [--calibration 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("MEDQUANT_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results"

from engine_tools.networks.zoo import SEED_MODELS  # noqa: E402  (after the path setup)

ZOO = list(SEED_MODELS)
MIB = 1024 * 1024


def machine() -> dict[str, Any]:
    """CPU model, core counts and the ISA flags that decide INT8/BF16 kernels."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name")
        info["cpus"] = fields.get("CPU(s)")
        info["threads_per_core"] = fields.get("Thread(s) per core")
        flags = set(fields.get("Flags", "").split())
        info["flags"] = {
            f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        }
    except (OSError, subprocess.CalledProcessError) as exc:
        info["lscpu_error"] = str(exc)
    info["os_cpu_count"] = os.cpu_count()
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


#: Which cards' published-weight loading is verified against the publisher's code (kept in every report).
PUBLISHED_WEIGHTS_NOTE = (
    "Published weights are not in these runs. How each card loads them is verified by "
    "Testing/engine_tools/test_published_weights.py: random values written in the publisher's "
    "exact file format, loaded through build_network/export_onnx from a weights mirror, outputs "
    "compared with the publisher's implementation on the same weights. Verified: unet-btcv, "
    "transunet-btcv (the MedPTQ FP32 ONNX itself, exported with initializers as inputs, is the "
    "export), swinunetr-btcv (against MONAI 1.4.0's SwinUNETR, whose patch-merging order the "
    "bundle was trained with), segresnet-wholebody (bundle zip), vista3d (bundle model.pt of "
    "vista3d132), nnunet-totalseg (TotalSegmentator archive: checkpoint_final.pth with numpy "
    "scalars, plans.json), stunet-totalseg (nnU-Net v1 .model and plans.pkl). unest-wholebrain is "
    "compared with the bundle's own network code (stored reference logits)."
)


def standard_notes(machine_info: dict[str, Any]) -> list[str]:
    """What a reader needs to interpret the table on this machine."""
    flags = machine_info.get("flags", {})
    notes = []
    if not (flags.get("avx512_vnni") or flags.get("amx_int8")):
        notes.append(
            "No AVX-512 VNNI/AMX on this CPU: OpenVINO's INT8 runs AVX2 u8s8 kernels; with VNNI/AMX the INT8 gain is larger."
        )
    if not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
        notes.append(
            "No native BF16 on this CPU: the BF16 hint is emulated, so BF16 is not faster than FP32 here."
        )
    notes.append(
        "Engine sizes are OpenVINO IR files; the paper's TensorRT engines include tactic data, so compare the ratios."
    )
    notes.append(PUBLISHED_WEIGHTS_NOTE)
    return notes


def calibration_windows(card: Any, count: int) -> np.ndarray:
    """``count`` windows from the real scan matching the card's modality, after the card's preprocessing."""
    from engine_tools.calibration_sampling import evenly_spaced_windows
    from engine_tools.volumes import preprocess, read_image

    path = SHARED / (
        "data/mri/mni152_2009_t1.nii.gz" if card.modality == "MR" else "data/ct/example_ct.nii.gz"
    )
    array = preprocess(read_image(path), card).array
    return evenly_spaced_windows(array, card.window_size, count)


def bench_model(model_id: str, repeats: int, calibration: int, workdir: Path) -> dict[str, Any]:
    import torch

    from engine_tools.networks.zoo.build import build_zoo_network, export_module_onnx, openvino_engines
    from engine_tools.registry import get_card

    card = get_card(model_id)
    result: dict[str, Any] = {
        "model": model_id,
        "architecture": card.architecture,
        "window": list(card.window_size),
    }
    started = time.perf_counter()
    module = build_zoo_network(card)  # full published configuration, random weights
    result["parameters_m"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 3)
    onnx_path = export_module_onnx(module, workdir / f"{model_id}.onnx", card.in_channels, card.window_size)
    del module
    torch.set_num_threads(os.cpu_count() or 1)
    result["export_s"] = round(time.perf_counter() - started, 1)
    result["onnx_mib"] = round(onnx_path.stat().st_size / MIB, 2)
    windows = calibration_windows(card, calibration)
    window = windows[:1]
    precisions = ("fp32", "bf16", "int8")
    for precision, engine, build_s in openvino_engines(card, onnx_path, windows, precisions, workdir):
        engine.run(window)  # warm-up
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            engine.run(window)
            times.append(time.perf_counter() - tick)
        described = engine.describe()
        entry = {
            "latency_ms": round(1000 * statistics.median(times), 1),
            "latencies_ms": [round(1000 * t, 1) for t in times],
            "engine_mib": round(described["bytes_on_disk"] / MIB, 2),
            "build_s": round(build_s, 1),
            "compile_config": described.get("compile_config"),
        }
        if precision == "int8":
            kernels = described.get("kernels", {})
            entry["kernels"] = {k: kernels.get(k) for k in ("int8", "float", "convolutions")}
        result[precision] = entry
        print(f"  {model_id} {precision}: {entry['latency_ms']} ms, {entry['engine_mib']} MiB", flush=True)
        del engine
    fp32, int8, bf16 = result["fp32"], result["int8"], result["bf16"]
    result["int8_size_ratio"] = round(fp32["engine_mib"] / int8["engine_mib"], 2)
    result["int8_speedup_vs_fp32"] = round(fp32["latency_ms"] / int8["latency_ms"], 2)
    result["int8_speedup_vs_bf16"] = round(bf16["latency_ms"] / int8["latency_ms"], 2)
    result["published"] = card.raw.get("published", {})
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.get("flags", {}).items())
    lines = [
        "# Seed zoo on the CPU (OpenVINO), full published size, random weights",
        "",
        f"Machine: {m.get('cpu')} — {m.get('cpus')} logical CPUs ({m.get('threads_per_core')} threads/core); {flags}.",
        f"OpenVINO {report['versions'].get('openvino')}, NNCF {report['versions'].get('nncf')}, torch {report['versions'].get('torch')}.",
        "Latency: one window, batch 1, median of the model's `repeats` runs (JSON) after one warm-up; FP32 = strict "
        "`INFERENCE_PRECISION_HINT=f32`; BF16 = `bf16` hint; INT8 = NNCF MinMax PTQ "
        f"({report['calibration_windows']} real-scan calibration windows). Size = OpenVINO IR on disk.",
        "Weights are random (published weights unreachable here): sizes and latencies are those of the real "
        "architectures; accuracy is not measured by this benchmark.",
        "",
        "| model | window | params (M) | FP32 MiB | INT8 MiB | size x | FP32 ms | BF16 ms | INT8 ms | INT8 vs FP32 | INT8 vs BF16 | INT8 conv kernels | paper TRT MB FP32→INT8 | paper TRT ms FP32→INT8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:120]} |" + " |" * 12)
            continue
        p = r.get("published", {})
        paper_mb = f"{p['tensorrt_fp32_mb']}→{p['tensorrt_int8_mb']}" if "tensorrt_fp32_mb" in p else "—"
        paper_ms = f"{p['latency_fp32_ms']}→{p['latency_int8_ms']}" if "latency_fp32_ms" in p else "—"
        conv = r["int8"].get("kernels", {}).get("convolutions") or {}
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['window']))} | {r['parameters_m']} | {r['fp32']['engine_mib']} | "
            f"{r['int8']['engine_mib']} | {r['int8_size_ratio']} | {r['fp32']['latency_ms']} | {r['bf16']['latency_ms']} | "
            f"{r['int8']['latency_ms']} | {r['int8_speedup_vs_fp32']}x | {r['int8_speedup_vs_bf16']}x | "
            f"{conv.get('int8', '?')}/{(conv.get('int8') or 0) + (conv.get('float') or 0)} | {paper_mb} | {paper_ms} |"
        )
    lines += [
        "",
        "Paper (MedPTQ, arXiv 2501.17343, TensorRT on an unnamed NVIDIA GPU): INT8 is 3.17–3.83x smaller and "
        "2.06–2.74x faster than FP32. STU-Net is not in the paper's table.",
    ]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=ZOO)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=2, help="calibration windows per model")
    parser.add_argument("--output", type=Path, default=RESULTS / "zoo_cpu.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("NNCF_CI", "1")  # no NNCF/OpenVINO telemetry from benchmarks
    import nncf
    import openvino
    import torch

    existing: dict[str, Any] = {}
    if args.output.is_file():  # resume: keep models measured by an earlier (interrupted) run
        existing = {
            r["model"]: r for r in json.loads(args.output.read_text()).get("models", []) if "error" not in r
        }
    report: dict[str, Any] = {
        "machine": machine(),
        "versions": {"openvino": openvino.__version__, "nncf": nncf.__version__, "torch": torch.__version__},
        "repeats": args.repeats,
        "calibration_windows": args.calibration,
        "weights": "random (seeded); published weights not reachable from this machine",
        "models": [],
        "notes": [],
    }
    report["notes"] = standard_notes(report["machine"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for model_id in args.models:
        if model_id in existing:
            report["models"].append(existing[model_id])
            continue
        print(f"{model_id} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"zoo-{model_id}-") as tmp:
            try:
                report["models"].append(bench_model(model_id, args.repeats, args.calibration, Path(tmp)))
            except Exception as exc:  # report and go on with the next model
                report["models"].append({"model": model_id, "error": f"{type(exc).__name__}: {exc}"})
                print(f"  {model_id} failed: {exc}", flush=True)
        write_results(report, existing, args.output)
    return 0


def write_results(report: dict[str, Any], earlier: dict[str, dict[str, Any]], output: Path) -> None:
    """Write JSON + markdown atomically, keeping earlier results of models this run did not measure."""
    measured = {r["model"]: r for r in report["models"]}
    merged = {**earlier, **measured}
    order = [*ZOO, *(m for m in merged if m not in ZOO)]
    report = {**report, "models": [merged[m] for m in order if m in merged]}
    tmp_out = output.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    tmp_out.replace(output)
    md = output.with_suffix(".md")
    md.with_suffix(".tmp").write_text(markdown(report))
    md.with_suffix(".tmp").replace(md)


if __name__ == "__main__":
    raise SystemExit(main())
