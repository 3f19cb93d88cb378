"""Imports every module of ``MedQuantSlicerLib`` and the light core parts the GUI process uses.

Run by ``.ci/check_slicer_python.sh`` under Slicer's Python version in an environment without PyTorch or
the inference engines: an import that needs them at module level, or syntax newer than that Python, fails.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "openvino", "nncf", "onnxruntime", "monai", "modelopt", "tensorrt")


def main() -> int:
    sys.path[:0] = [str(REPO / "MedQuantSlicer"), str(REPO)]
    import MedQuantSlicerLib

    names = [f"MedQuantSlicerLib.{m.name}" for m in pkgutil.iter_modules(MedQuantSlicerLib.__path__)]
    names += ["engine_tools.progress"]
    for name in names:
        importlib.import_module(name)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    if heavy:
        print(f"the GUI-side modules imported heavy packages: {heavy}", file=sys.stderr)
        return 1
    print(f"Python {sys.version.split()[0]}: imported {len(names)} modules without PyTorch or engines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
