"""Where ``engine_tools`` and the extension resources live, and the worker command line.

Two layouts are supported:

* source checkout (Slicer "Add module path" pointing at ``<repo>/MedQuantSlicer``)::

      <repo>/MedQuantSlicer/MedQuantSlicer.py   <repo>/engine_tools/   <repo>/Resources/

* packaged extension (CMake installs everything into Slicer's ``qt-scripted-modules`` folder)::

      <qt-scripted-modules>/MedQuantSlicer.py   <qt-scripted-modules>/engine_tools/
      <qt-scripted-modules>/Resources/{UI,Icons,ModelCards}
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

WORKER_PYTHON_ENV = "MEDQUANT_WORKER_PYTHON"
UI_FILE = Path("UI") / "MedQuantSlicer.ui"
ICON_FILE = Path("Icons") / "MedQuantSlicer.png"


def module_dir() -> Path:
    """The folder holding ``MedQuantSlicer.py`` (parent of this package)."""
    return Path(__file__).resolve().parent.parent


def _candidates() -> list[Path]:
    here = module_dir()
    return [here, here.parent]


def engine_tools_root() -> Path:
    """The folder that contains the ``engine_tools`` package (put on ``sys.path`` / ``PYTHONPATH``)."""
    for folder in _candidates():
        if (folder / "engine_tools" / "__init__.py").is_file():
            return folder
    raise FileNotFoundError(
        "engine_tools not found beside the MedQuantSlicer module (looked in "
        + ", ".join(str(c) for c in _candidates())
        + "); reinstall the extension or use a complete source checkout"
    )


def resources_dir() -> Path:
    """The extension's ``Resources`` folder (UI file, icon, model cards)."""
    for folder in _candidates():
        if (folder / "Resources" / UI_FILE).is_file():
            return folder / "Resources"
    raise FileNotFoundError(f"Resources/{UI_FILE} not found in " + ", ".join(str(c) for c in _candidates()))


def ui_file() -> Path:
    return resources_dir() / UI_FILE


def icon_file() -> Path:
    return resources_dir() / ICON_FILE


def ensure_engine_tools_importable() -> Path:
    """Put :func:`engine_tools_root` on ``sys.path`` (for light imports such as the progress schema)."""
    root = engine_tools_root()
    if str(root) not in sys.path:
        sys.path.append(str(root))
    return root


def running_in_slicer() -> bool:
    """True inside the Slicer application (``slicer.app`` exists), False with PyPI ``slicer-core``."""
    slicer = sys.modules.get("slicer")
    return slicer is not None and hasattr(slicer, "app")


def worker_python() -> str:
    """The interpreter that runs workers: ``$MEDQUANT_WORKER_PYTHON``, Slicer's ``PythonSlicer``, else
    this interpreter."""
    if os.environ.get(WORKER_PYTHON_ENV):
        return os.environ[WORKER_PYTHON_ENV]
    if running_in_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
        import slicer  # noqa: PLC0415 - only inside the application

        candidate = (
            Path(slicer.app.slicerHome) / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
        )
        if candidate.exists():
            return str(candidate)
    return sys.executable


def worker_command(subcommand: str, *args: str, python: str | None = None) -> list[str]:
    """``<python> -m engine_tools <subcommand> <args...> --progress jsonl``."""
    return [python or worker_python(), "-m", "engine_tools", subcommand, *args, "--progress", "jsonl"]


def worker_environment(
    base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of a worker: ``engine_tools`` importable, unbuffered UTF-8 output."""
    env = dict(os.environ if base is None else base)
    root = str(engine_tools_root())
    existing = env.get("PYTHONPATH", "")
    parts = [p for p in existing.split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


def quote_command(command: Sequence[str]) -> str:
    """The command as one shell-like line (shown in the log so a user can rerun it by hand)."""
    import shlex

    return " ".join(shlex.quote(part) for part in command)
