"""The one dependency list (pyproject.toml) covers every package that ``engine_tools`` imports.

Imports are read from the source (module level and lazy imports inside functions), so a backend, zoo
builder or report that imports a package only when used is covered too.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from shared_data import REPO

# Imported only on NVIDIA machines, installed from requirements-tensorrt.txt (TensorRT) or shipped by
# PyTorch's CUDA builds (Triton); the CPU install cannot hold them.
GPU_ONLY = {"tensorrt": "requirements-tensorrt.txt", "triton": "PyTorch CUDA builds"}


def _imported_top_level(package: Path) -> set[str]:
    names: set[str] = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"engine_tools", "__future__"}


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = list(project["project"]["dependencies"])
    for extra in project["project"]["optional-dependencies"].values():
        requirements += extra
    requirements += project["tool"]["medquant"]["install"]["no-deps"]
    return {_normalise(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def test_every_engine_tools_import_is_a_declared_dependency() -> None:
    imported = _imported_top_level(REPO / "engine_tools")
    assert {"torch", "openvino", "nncf", "monai", "SimpleITK"} <= imported  # the reader sees the imports
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared: dict[str, list[str]] = {}
    for module in sorted(imported - set(GPU_ONLY)):
        distributions = providers.get(module)
        if not distributions:
            undeclared[module] = ["<not installed by the install step>"]
        elif not {_normalise(d) for d in distributions} & declared:
            undeclared[module] = distributions
    assert not undeclared, f"imported by engine_tools but not in pyproject.toml: {undeclared}"


def test_gpu_only_packages_are_named_in_the_tensorrt_requirements() -> None:
    assert "tensorrt" in (REPO / GPU_ONLY["tensorrt"]).read_text()
