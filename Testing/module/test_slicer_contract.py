"""What the module promises the Slicer application: version check at load, light GUI imports, the
worker's environment, the error dialog's arguments.

The Slicer application itself is not available here; where its modules are needed (``qt``,
``slicer.app``, ``slicer.util``) a minimal stand-in with the same names replaces them, and the
assertions are on what the module does with them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from MedQuantSlicerLib import paths, process_tree
from MedQuantSlicerLib.process import ThreadWorkerProcess
from MedQuantSlicerLib.slicer_host import SlicerHost
from mrml_helpers import MODULE_DIR

STUB_SLICER = {
    "qt.py": "class QIcon:\n    def __init__(self, *a): pass\nclass QLabel(QIcon):\n    def setWordWrap(self, *a): pass\n",
    "slicer/__init__.py": textwrap.dedent(
        """
        import types, os
        major, minor = map(int, os.environ["STUB_SLICER_VERSION"].split("."))
        app = types.SimpleNamespace(majorVersion=major, minorVersion=minor)
        mrmlScene = None
        util = types.SimpleNamespace()
        """
    ),
    "slicer/ScriptedLoadableModule.py": textwrap.dedent(
        """
        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent
        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None):
                self.parent = parent
        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                pass
        class ScriptedLoadableModuleTest:
            pass
        """
    ),
}

LOAD_MODULE = textwrap.dedent(
    """
    import json, sys, types
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import MedQuantSlicer
    parent = types.SimpleNamespace()
    MedQuantSlicer.MedQuantSlicer(parent)
    try:
        MedQuantSlicer.MedQuantSlicerLogic()
        logic = "created"
    except RuntimeError as exc:
        logic = str(exc)
    print(json.dumps({"help": parent.helpText, "logic": logic,
                      "lib_loaded": "MedQuantSlicerLib.logic" in sys.modules}))
    """
)


def _python(version: str) -> str:
    """An interpreter of that version (pyenv's, as CI has them), else skip."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(root.glob(f"{version}.*/bin/python{version}")):
        return str(candidate)
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", ""], capture_output=True, check=False).returncode == 0:
        return found
    pytest.skip(f"Python {version} is not installed here")


@pytest.mark.parametrize(
    "python,slicer_version,supported",
    [("3.9", "5.8", False), ("3.12", "5.8", False), ("3.12", "5.10", True)],
)
def test_module_file_loads_on_old_slicer_with_a_clear_message(tmp_path, python, slicer_version, supported):
    for name, text in STUB_SLICER.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "load.py").write_text(LOAD_MODULE)
    env = {"PATH": os.environ["PATH"], "STUB_SLICER_VERSION": slicer_version, "HOME": str(tmp_path)}
    done = subprocess.run(
        [_python(python), str(tmp_path / "load.py"), str(tmp_path), str(MODULE_DIR)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # no TypeError from `float | None` at import
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    if supported:
        assert loaded == {"help": loaded["help"], "logic": "created", "lib_loaded": True}
        assert "INT8" in loaded["help"]
    else:
        assert (
            "needs 3D Slicer 5.10 or newer" in loaded["help"] and f"Slicer {slicer_version}" in loaded["help"]
        )
        assert "needs 3D Slicer 5.10" in loaded["logic"] and loaded["lib_loaded"] is False


LIGHT_IMPORT = textwrap.dedent(
    """
    import json, os, sys
    before = dict(os.environ)
    sys.path.insert(0, sys.argv[1])
    from MedQuantSlicerLib import dependencies, events, logic, mrml_io, panel, process, selftest, tasks
    events.EventParser().feed(b'{"event": "progress", "stage": "s", "fraction": 0.5, "message": "", "elapsed": 1}\\n')
    logic.MedQuantLogic().cache_root()
    dependencies.check("run")
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {
        "engine_tools", "openvino", "openvino_telemetry", "nncf", "torch", "onnxruntime", "monai"})
    changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))
    print(json.dumps({"heavy": heavy, "changed": changed}))
    """
)


def test_gui_process_imports_only_light_parts_of_engine_tools():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NNCF_CI", "NO_TELEMETRY", "OPENVINO_TELEMETRY_DISABLED")
    }
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORT, str(MODULE_DIR)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "changed": []}, report


def test_foreign_worker_python_gets_slicer_startup_environment(monkeypatch):
    """``$MEDQUANT_WORKER_PYTHON`` is not a CTK launcher: it must not inherit Slicer's PYTHONHOME."""
    startup = dict(os.environ)
    monkeypatch.setenv("PYTHONHOME", "/opt/Slicer-5.10/lib/Python")  # what Slicer's launcher sets
    monkeypatch.setenv(paths.WORKER_PYTHON_ENV, sys.executable)
    fake_util = types.SimpleNamespace(startupEnvironment=lambda: dict(startup))
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object(), util=fake_util))
    env = paths.worker_environment()
    assert "PYTHONHOME" not in env and env["PYTHONPATH"].split(os.pathsep)[0] == str(
        paths.engine_tools_root()
    )
    worker = ThreadWorkerProcess(
        [
            paths.worker_python(),
            "-c",
            'import sys; print(\'{"event": "result", "data": {"ok": 1}, "elapsed": 0}\')',
        ],
        env=env,
    )
    worker.start()
    outcome = worker.wait(60)  # with Slicer's PYTHONHOME this interpreter could not even start
    assert outcome.succeeded, outcome.message()
    monkeypatch.delenv(paths.WORKER_PYTHON_ENV)
    assert paths.worker_environment()["PYTHONHOME"] == "/opt/Slicer-5.10/lib/Python"  # PythonSlicer: as is


def test_windows_worker_starts_without_a_console_window():
    options = process_tree.new_group_options(windows=True)
    assert options["creationflags"] & process_tree.CREATE_NO_WINDOW
    assert options["creationflags"] & 0x00000200  # its own group, for CTRL_BREAK_EVENT
    assert process_tree.new_group_options(windows=False) == {"start_new_session": True}


def test_error_dialog_leaves_out_empty_details():
    shown = []
    util = types.SimpleNamespace(errorDisplay=lambda text, **kwargs: shown.append((text, kwargs)))
    host = SlicerHost(None, types.SimpleNamespace(), types.SimpleNamespace(mrmlScene=None, util=util))
    host.show_error("Could not export T1", "")
    host.show_error("Worker failed", "last log lines")
    assert shown[0] == ("Could not export T1", {"windowTitle": "MedQuantSlicer"})
    assert shown[1][1]["detailedText"] == "last log lines"
