"""Static checks: widget names used by the code exist in the .ui; CMake lists exactly what exists;
no PythonQt-only or PySide-only idioms in the panel code."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from mrml_helpers import MODULE_DIR, REPO

UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedQuantSlicer.ui"
CODE = [MODULE_DIR / "MedQuantSlicer.py", *sorted((MODULE_DIR / "MedQuantSlicerLib").glob("*.py"))]


def _ui_names() -> set[str]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name") for w in root.iter("widget")}


def test_every_referenced_widget_exists_in_ui():
    names = _ui_names()
    referenced = set()
    for path in CODE:
        referenced |= set(re.findall(r"\bui\.([A-Za-z_]\w*)", path.read_text()))
    assert referenced, "no ui.<widget> references found"
    missing = sorted(referenced - names)
    assert not missing, f"widgets used in code but absent from {UI_FILE.name}: {missing}"
    # the input selector lists scalar volumes only (no label maps, no vector volumes), as Slicer's
    # module template does
    selector = next(
        w for w in ET.parse(UI_FILE).getroot().iter("widget") if w.get("name") == "inputVolumeSelector"
    )
    props = {p.get("name"): p for p in selector.findall("property")}
    assert props["showChildNodeTypes"].find("bool").text == "false"
    # and the root is a qMRMLWidget as Slicer expects
    root_widget = ET.parse(UI_FILE).getroot().find("widget")
    assert root_widget.get("class") == "qMRMLWidget"


def test_no_non_portable_qt_idioms():
    bad = [
        (re.compile(r"\.(enabled|checked|text|value|currentIndex|visible)\s*=[^=]"), "property assignment"),
        (re.compile(r"\.connect\(\s*['\"]"), "string-signal connect"),
    ]
    for path in [MODULE_DIR / "MedQuantSlicerLib" / "panel.py", MODULE_DIR / "MedQuantSlicer.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in bad:
                assert not pattern.search(line), f"{path.name}:{number}: {what}: {line.strip()}"


def _cmake_listed(cmake: Path, variable: str) -> list[str]:
    text = cmake.read_text()
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert block, f"{cmake}: {variable} not found"
    module = "MedQuantSlicer"
    return [
        line.strip().replace("${MODULE_NAME}", module)
        for line in block.group(1).splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_cmake_lists_every_module_file_and_only_existing_ones():
    cmake = MODULE_DIR / "CMakeLists.txt"
    listed = _cmake_listed(cmake, "MODULE_PYTHON_SCRIPTS")
    for item in listed:
        assert (MODULE_DIR / item).is_file(), f"{cmake} lists {item}, which does not exist"
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in CODE}
    assert on_disk == set(listed), f"not listed in CMake: {sorted(on_disk - set(listed))}"
    root_cmake = (REPO / "CMakeLists.txt").read_text()
    for resource in re.findall(r"(?<![/\w])(Resources/[\w/]+\.\w+)", root_cmake):
        assert (REPO / resource).is_file(), f"top-level CMakeLists.txt lists missing {resource}"
    # module resources: installed under the module, where resourcePath() looks
    resources = _cmake_listed(cmake, "MODULE_PYTHON_RESOURCES")
    assert sorted(resources) == sorted(
        str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()
    )
    # the one dependency list is installed beside the module; torch comes with the PyTorch extension
    assert re.search(r"set\(MEDQUANT_RESOURCES\s+pyproject\.toml", root_cmake)
    assert re.search(r"set\(EXTENSION_DEPENDS\s+PyTorch\)", root_cmake)
    for required in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_ICONURL",
        "EXTENSION_DEPENDS",
        "add_subdirectory(MedQuantSlicer)",
        "find_package(Slicer",
    ):
        assert required in root_cmake
    assert "WITH_GENERIC_TESTS" in cmake.read_text() and "slicer_add_python_unittest" in cmake.read_text()


def test_icon_is_a_real_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "MedQuantSlicer.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_paths_resolve_in_source_checkout():
    from MedQuantSlicerLib import paths

    assert paths.engine_tools_root() == REPO
    assert paths.ui_file() == UI_FILE
    assert paths.pyproject_file() == REPO / "pyproject.toml"
    # Slicer's ScriptedLoadableModule.resourcePath(f) is <folder of MedQuantSlicer.py>/Resources/f
    # (Base/Python/slicer/ScriptedLoadableModule.py); "Edit UI" opens resourcePath("UI/<module>.ui")
    assert (MODULE_DIR / "Resources" / "UI" / "MedQuantSlicer.ui") == paths.ui_file()
    assert (MODULE_DIR / "Resources" / "Icons" / "MedQuantSlicer.png") == paths.icon_file()
    command = paths.worker_command("models")
    assert command[1:4] == ["-m", "engine_tools", "models"] and command[-2:] == ["--progress", "jsonl"]
    env = paths.worker_environment({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":")[0] == str(REPO) and "/elsewhere" in env["PYTHONPATH"]


def test_result_rows_from_segment_timings():
    from MedQuantSlicerLib.results import row_from_segment

    row = row_from_segment(
        {
            "engine": {
                "backend": "openvino",
                "precision": "int8",
                "device": "cpu",
                "bytes_on_disk": 3 * 2**20,
                "cache": "hit",
            },
            "timings": {"median_window_latency_s": 0.0425, "total_s": 7.5},
        }
    )
    assert row.precision == "INT8" and row.size_mb == 3.0 and row.latency_ms == 42.5 and row.total_s == 7.5
    assert "cached" in row.engine
    assert row.cells()[:5] == ["INT8", "openvino (cpu), cached", "3.00", "42.5", "7.50"]
    assert not row.below_target
    below = row_from_segment(
        {"engine": {"precision": "int8", "accuracy_guard": {"below_target": True}}, "below_target": True}
    )
    assert below.below_target  # the panel shows such a row in red
