"""Where ``engine_tools`` and the extension resources live, and the worker command line.

Two layouts are supported:

* source checkout (Slicer "Add module path" pointing at ``<repo>/MedQuantSlicer``)::

      <repo>/MedQuantSlicer/MedQuantSlicer.py   <repo>/MedQuantSlicer/Resources/{UI,Icons}
      <repo>/engine_tools/   <repo>/Resources/ModelCards/   <repo>/pyproject.toml

* packaged extension (CMake installs everything into Slicer's ``qt-scripted-modules`` folder)::

      <qt-scripted-modules>/MedQuantSlicer.py   <qt-scripted-modules>/Resources/{UI,Icons,ModelCards}
      <qt-scripted-modules>/engine_tools/   <qt-scripted-modules>/pyproject.toml

The UI file and icon live in ``MedQuantSlicer/Resources`` in both layouts, which is where Slicer's
``ScriptedLoadableModule.resourcePath()`` and the "Edit UI" button look (``<module folder>/Resources``,
Base/Python/slicer/ScriptedLoadableModule.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

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
    """The module's ``Resources`` folder (UI file, icon): ``<module folder>/Resources`` in both layouts."""
    folder = module_dir() / "Resources"
    if (folder / UI_FILE).is_file():
        return folder
    raise FileNotFoundError(f"{folder / UI_FILE} not found; reinstall the extension")


def pyproject_file() -> Path:
    """``pyproject.toml``, the one dependency list (repository root, or installed beside the module)."""
    for folder in _candidates():
        if (folder / "pyproject.toml").is_file():
            return folder / "pyproject.toml"
    raise FileNotFoundError("pyproject.toml not found in " + ", ".join(str(c) for c in _candidates()))


def ui_file() -> Path:
    return resources_dir() / UI_FILE


def icon_file() -> Path:
    return resources_dir() / ICON_FILE


#: ``engine_tools`` modules the GUI process may load: standard library only, no side effects.
LIGHT_MODULES = ("progress", "cache")


def light_module(name: str) -> ModuleType:
    """Load ``engine_tools/<name>.py`` on its own, without running ``engine_tools/__init__.py``.

    The package's ``__init__`` opts out of NNCF/OpenVINO telemetry for the worker (environment
    variables, a patched consent check): right for a worker process, wrong for all of Slicer. The GUI
    needs only the progress schema and the cache location, which import the standard library alone.
    """
    if name not in LIGHT_MODULES:
        raise ValueError(f"engine_tools.{name} is not one of the light modules {LIGHT_MODULES}")
    key = f"_medquant_light_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = engine_tools_root() / "engine_tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


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


def base_environment() -> dict[str, str]:
    """The environment a worker starts from.

    ``PythonSlicer`` (a CTK launcher) sets up Slicer's paths itself, so it gets this process's
    environment. Any other interpreter (``$MEDQUANT_WORKER_PYTHON``) must not inherit Slicer's
    ``PYTHONHOME``/``PYTHONPATH``/library paths: it gets ``slicer.util.startupEnvironment()``, the
    environment Slicer was started with, as ``slicer.util.launchConsoleProcess`` does
    (Base/Python/slicer/util.py).
    """
    if os.environ.get(WORKER_PYTHON_ENV) and running_in_slicer():
        import slicer  # noqa: PLC0415 - only inside the application

        return {str(k): str(v) for k, v in slicer.util.startupEnvironment().items() if v is not None}
    return dict(os.environ)


def worker_environment(
    base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of a worker: ``engine_tools`` importable, unbuffered UTF-8 output."""
    env = dict(base_environment() if base is None else base)
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
