"""Worker start-up on the CPU: what a fresh ``medquant segment`` process imports before it segments.

With a cached engine the segment path imports only the run-only set (numpy, SimpleITK, OpenVINO,
filelock; ``[tool.medquant.install] run-only`` in pyproject.toml). Before, it also imported PyTorch and
MONAI (preprocessing, sliding windows), NNCF (the INT8 engine's version key), ONNX and nibabel. This
times both import sets in fresh processes (median of ``--repeats``), with the load average, so the
start-up saved per command is a number rather than a claim::

    python bench/startup.py --out bench/results/startup_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_PATH = "engine_tools.cli, engine_tools.commands.segment, engine_tools.segment, engine_tools.pipeline"
SETS = {
    "run-only (segment path with a cached engine)": f"import {SEGMENT_PATH}, openvino",
    "segment path plus what it imported before (torch, monai, nncf, onnx, nibabel)": (
        f"import {SEGMENT_PATH}, openvino, torch, monai.transforms, nncf, onnx, nibabel"
    ),
}


def fresh_import_s(statement: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/startup_cpu"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine_tools.machine import machine_description

    fresh_import_s("import openvino, torch, monai.transforms, nncf")  # warm the file cache once
    rows = {}
    for name, statement in SETS.items():
        times = [fresh_import_s(statement) for _ in range(args.repeats)]
        rows[name] = {"median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times]}
    machine = machine_description()
    report = {"machine": machine, "load_average": os.getloadavg(), "statements": SETS, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    flags = ", ".join(k for k, v in machine["cpu_flags"].items() if v)
    lines = [
        "# Worker start-up: imports of a fresh `medquant segment` process",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, flags {flags}. Load average after the run "
        f"(1, 5, 15 min): {tuple(round(x, 1) for x in report['load_average'])} on {machine['cores']} cores: "
        "other processes shared the CPU, so absolute times are upper bounds; the rows ran one after the other "
        "within about two minutes.",
        "",
        f"| imports | median of {args.repeats} fresh processes (s) | runs (s) |",
        "|---|---|---|",
        *[
            f"| {name} | {row['median_s']} | {', '.join(map(str, row['runs_s']))} |"
            for name, row in rows.items()
        ],
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
