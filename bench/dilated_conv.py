"""Dilated convolutions on the CPU: direct kernels against the sub-grid rewrite, per layer and per pass.

For each brainchop MeshNet this measures, on one whole head-cropped volume (and per layer on one
card-sized window), strict FP32, BF16 and INT8 (NNCF, calibrated on the other shared MRI, layers left
unquantized run in BF16 like the product's INT8 engines on CPUs with native BF16), each with the
dilated convolutions run directly and on sub-grids (:mod:`engine_tools.engines.openvino.dilated`).
Per-layer times come from OpenVINO's own profiling counters (``PERF_COUNT``) with the kernel each
layer ran. Agreement: argmax labels against strict FP32 over the volume.

Volumes come from ``python bench/int8_recipes.py prepare`` (both MRIs preprocessed and head-cropped).

    python bench/dilated_conv.py --models brainchop-model18cls --threads 2

writes ``bench/results/dilated_conv_cpu.json`` and ``.md`` naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("MEDQUANT_BENCH_RESULTS", ROOT / "bench" / "results"))
VOLUMES = Path(os.environ.get("MEDQUANT_BENCH_VOLUMES", RESULTS / ".volumes.npz"))
SCANS = ("mni152_2009_t1", "t1_crop")
#: label, INFERENCE_PRECISION_HINT, quantized model?, dilated convolutions mode
PLANS = (
    ("fp32", "f32", False, "direct"),
    ("bf16", "bf16", False, "direct"),
    ("bf16", "bf16", False, "subgrid"),
    ("int8", "bf16", True, "direct"),
    ("int8", "bf16", True, "subgrid"),
)


def _compile(model: Any, shape: list[int], hint: str, mode: str, threads: int, profile: bool) -> Any:
    import openvino as ov

    from engine_tools.engines.openvino.runtime import compile_on_cpu

    os.environ["MEDQUANT_DILATED_CONVOLUTIONS"] = mode
    static = model.clone()
    static.reshape({static.input(0): ov.PartialShape(shape)})
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if profile:
        config["PERF_COUNT"] = "YES"
    return compile_on_cpu(static, config)


def whole_pass(
    model: Any, volume: np.ndarray, hint: str, mode: str, threads: int
) -> tuple[float, np.ndarray, int]:
    """Seconds of one pass over the volume, its labels, and how many convolutions ran on sub-grids."""
    compiled, rewritten = _compile(model, list(volume.shape), hint, mode, threads, profile=False)
    request = compiled.create_infer_request()
    started = time.perf_counter()
    logits = request.infer({0: volume})[compiled.outputs[0]]
    seconds = time.perf_counter() - started
    return seconds, np.asarray(logits).argmax(1).astype(np.uint8), len(rewritten)


def per_layer(model: Any, window: np.ndarray, hint: str, mode: str, threads: int) -> dict[str, Any]:
    """Per-convolution milliseconds and kernel from ``PERF_COUNT`` (second of two runs), plus the
    time of everything else (reorders, transposes, pads, activations) and the wall time."""
    compiled, _ = _compile(model, list(window.shape), hint, mode, threads, profile=True)
    request = compiled.create_infer_request()
    request.infer({0: window})
    started = time.perf_counter()
    request.infer({0: window})
    wall = time.perf_counter() - started
    convs: dict[str, dict[str, Any]] = {}
    other = 0.0
    for info in request.profiling_info:
        seconds = info.real_time.total_seconds()
        if info.node_type == "Convolution" and re.match(r"^/?[\w/]*Conv", info.node_name):
            convs[info.node_name] = {"ms": round(seconds * 1000, 1), "kernel": info.exec_type}
        else:
            other += seconds
    return {"wall_s": round(wall, 3), "other_ms": round(other * 1000, 1), "convolutions": convs}


def dilations(model: Any) -> dict[str, int]:
    return {
        op.get_friendly_name(): int(op.get_attributes()["dilations"][0])
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Convolution"
    }


def measure(
    model_id: str, onnx: Path, volumes: dict[str, np.ndarray], window: int, threads: int
) -> dict[str, Any]:
    import openvino as ov

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    calibrated_on, measured_on = SCANS
    fp32 = ov.Core().read_model(onnx)
    fp32.reshape({fp32.input(0): ov.PartialShape([1, 1, window, window, window])})
    started = time.perf_counter()
    adapter = NNCFAdapter(fp32, volumes[calibrated_on], {"int8_fallback": "bf16"})
    int8 = adapter.quantize([], adapter.recipe({}))
    quantize_s = time.perf_counter() - started
    volume = volumes[measured_on]
    crop = _centre(volume, window)
    rows, reference = [], None
    for label, hint, quantized, mode in PLANS:
        model = int8 if quantized else fp32
        seconds, labels, rewritten = whole_pass(model, volume, hint, mode, threads)
        reference = labels if reference is None else reference
        rows.append(
            {
                "precision": label,
                "dilated_convolutions": mode,
                "rewritten": rewritten,
                "whole_pass_s": round(seconds, 2),
                "label_agreement_vs_fp32": round(float((labels == reference).mean()), 5),
                "window": per_layer(model, crop, hint, mode, threads),
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "window"}), flush=True)
    return {
        "model": model_id,
        "calibrated_on": calibrated_on,
        "measured_on": measured_on,
        "volume_shape": list(volume.shape[2:]),
        "window": window,
        "quantize_s": round(quantize_s, 1),
        "dilations": dilations(fp32),
        "rows": rows,
    }


def write(results: list[dict[str, Any]], threads: int) -> None:
    from engine_tools.machine import machine_description

    machine = machine_description()
    data = {"machine": machine, "threads": threads, "models": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dilated_conv_cpu.json").write_text(json.dumps(data, indent=1, default=str))
    flags = ", ".join(k for k, v in machine.get("cpu_flags", {}).items() if v)
    lines = [
        "# Dilated convolutions on the CPU: direct kernels against sub-grids (OpenVINO)",
        "",
        f"Machine: {machine.get('cpu')}, {threads or machine.get('logical_cpus')} inference threads "
        f"({flags}). `python bench/dilated_conv.py --threads {threads}`.",
        "Whole pass: one head-cropped MRI in one pass; window: centred crop, per-layer times from "
        "OpenVINO's PERF_COUNT. INT8 = NNCF default recipe calibrated on the other MRI, unquantized "
        "ops in BF16. Agreement = argmax labels equal to strict FP32's, fraction of voxels.",
        "",
    ]
    for result in results:
        lines += _model_lines(result)
    (RESULTS / "dilated_conv_cpu.md").write_text("\n".join(lines) + "\n")


def _model_lines(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    lines = [
        f"## {result['model']} (volume {result['volume_shape']}, window {result['window']}^3)",
        "",
        "| precision | dilated convs | whole pass s | x FP32 | window s | label agreement |",
        "|---|---|---|---|---|---|",
    ]
    fp32 = rows[0]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['dilated_convolutions']} ({r['rewritten']}) | {r['whole_pass_s']} | "
            f"{fp32['whole_pass_s'] / r['whole_pass_s']:.2f} | {r['window']['wall_s']} | "
            f"{r['label_agreement_vs_fp32']} |"
        )
    header = [f"{r['precision']} {r['dilated_convolutions']}" for r in rows]
    lines += [
        "",
        "Per convolution (ms, window; kernel of the first INT8 column):",
        "",
        "| layer | dilation | " + " | ".join(header) + " | INT8 kernel |",
        "|---|---|" + "---|" * len(header) + "---|",
    ]
    for name, dilation in result["dilations"].items():
        cells = [str(r["window"]["convolutions"].get(name, {}).get("ms", "")) for r in rows]
        kernel = rows[3]["window"]["convolutions"].get(name, {}).get("kernel", "")
        lines.append(f"| {name} | {dilation} | " + " | ".join(cells) + f" | {kernel} |")
    lines.append("| everything else | | " + " | ".join(str(r["window"]["other_ms"]) for r in rows) + " | |")
    return lines + [""]


def _centre(volume: np.ndarray, size: int) -> np.ndarray:
    if not size:
        return volume
    start = [max(0, (s - size) // 2) for s in volume.shape[2:]]
    return volume[(slice(None), slice(None), *(slice(b, b + size) for b in start))].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="brainchop-model18cls", help="comma-separated card ids")
    parser.add_argument("--threads", type=int, default=2, help="inference threads (0: OpenVINO's default)")
    parser.add_argument("--window", type=int, default=192)
    parser.add_argument("--volume-crop", type=int, default=0, help="centred crop of the volumes (0: whole)")
    parser.add_argument("--onnx-dir", type=Path, help="folder of <card id>.onnx exports (default: export)")
    args = parser.parse_args()
    from int8_recipes import _onnx  # same folder

    volumes = {k: _centre(v[None], args.volume_crop) for k, v in np.load(VOLUMES).items()}
    results = []
    for model_id in [m for m in args.models.split(",") if m]:
        results.append(measure(model_id, _onnx(model_id, args.onnx_dir), volumes, args.window, args.threads))
        write(results, args.threads)


if __name__ == "__main__":
    main()
