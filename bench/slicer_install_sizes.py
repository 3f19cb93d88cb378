"""Install size of the Slicer module's two dependency sets, measured with ``pip install --target``.

* run only: what a user needs to segment with an INT8 engine already in the cache (OpenVINO, numpy,
  SimpleITK; numpy and SimpleITK ship with Slicer).
* build engines: the whole dependency list of ``pyproject.toml`` (PyTorch from its CPU wheel).

Each set goes into a fresh empty folder; the size of every installed distribution is summed from its
``RECORD``. Packages Slicer already ships (numpy, SimpleITK, scipy, pydicom) are reported apart, since
the module never installs them into Slicer. Usage: ``python bench/slicer_install_sizes.py [torch-spec]``
(e.g. a local CPU wheel of PyTorch); writes ``bench/results/slicer_install_sizes.json``.
"""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedQuantSlicer"))
from MedQuantSlicerLib import dependencies  # noqa: E402

SLICER_SHIPS = {"numpy", "simpleitk", "scipy", "pydicom"}


def _sizes(target: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for record in target.glob("*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0].lower().replace("_", "-")
        total = 0
        with record.open(newline="") as handle:
            for row in csv.reader(handle):
                path = target / row[0]
                if path.is_file():
                    total += path.stat().st_size
        out[name] = total
    return out


def measure(requirements: list[str], extra: list[str] = ()) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--target",
                str(target),
                *extra,
                *requirements,
            ],
            check=True,
        )
        sizes = _sizes(target)
    own = {k: v for k, v in sizes.items() if k.replace("-", "") not in SLICER_SHIPS}
    return {
        "requirements": requirements,
        "distributions": len(sizes),
        "mb_total": round(sum(sizes.values()) / 2**20, 1),
        "mb_installed_into_slicer": round(sum(own.values()) / 2**20, 1),
        "largest_mb": {k: round(v / 2**20, 1) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:6]},
    }


def main() -> None:
    torch_spec = sys.argv[1] if len(sys.argv) > 1 else "torch"
    listed = dependencies.requirements_from_pyproject(REPO / "pyproject.toml")
    run_only = [str(listed[name]) for name in dependencies.RUN_ONLY]
    build = [torch_spec if r.name == "torch" else str(r) for r in listed.values()]
    no_deps = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["medquant"]["install"]["no-deps"]
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "run_only": measure(run_only),
        "build_engines": measure(build),
        "build_engines_no_deps_extras": measure(no_deps, ["--no-deps"]),
    }
    text = json.dumps(report, indent=2)
    (REPO / "bench" / "results" / "slicer_install_sizes.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
