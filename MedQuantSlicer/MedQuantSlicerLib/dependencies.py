"""Python packages the worker needs, read from the one dependency list and installed only on request.

The list is ``[project] dependencies`` of ``pyproject.toml`` (at the repository root in a source
checkout; installed beside the module by the top-level ``CMakeLists.txt`` in an extension build).
Versions are checked with :mod:`importlib.metadata` and :mod:`packaging` (an installed but too old
package counts as missing). Two purposes:

* ``run``: segment with an engine already in the cache (OpenVINO + numpy + SimpleITK);
* ``build``: build engines (the whole list, PyTorch included).

Nothing is installed at import time. Packages that Slicer ships (numpy, SimpleITK, scipy, pydicom) are
never installed or upgraded by this module: replacing them breaks Slicer. They are also pinned to
their installed versions in a constraints file, so no other requirement drags in a replacement.
PyTorch comes from the PyTorch extension's ``PyTorchUtils`` (``EXTENSION_DEPENDS PyTorch``) when it
is present, else from PyTorch's CPU wheel index. Everything else goes through
``slicer.packaging.pip_ensure`` (Slicer 5.12+) or ``slicer.util.pip_install`` (Slicer 5.10).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import paths

#: Shipped with Slicer: checked, never installed or upgraded by this module.
SLICER_PROVIDES = ("numpy", "simpleitk", "scipy", "pydicom")
#: What running a cached INT8 engine needs (OpenVINO on the CPU).
RUN_ONLY = ("openvino", "numpy", "simpleitk")
#: PyTorch's CPU wheels (Linux and Windows; the default macOS wheel is already CPU-only).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

VersionOf = Callable[[str], str]


def canonical(name: str) -> str:
    """PEP 503 name (``SimpleITK`` → ``simpleitk``, ``openvino_telemetry`` → ``openvino-telemetry``)."""
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def requirements_from_pyproject(path: str | Path | None = None) -> dict[str, Any]:
    """``{canonical name: packaging Requirement}`` from ``[project] dependencies``."""
    import tomllib

    from packaging.requirements import Requirement

    path = Path(path) if path is not None else paths.pyproject_file()
    listed = tomllib.loads(path.read_text(encoding="utf-8"))["project"]["dependencies"]
    requirements = [Requirement(text) for text in listed]
    return {canonical(r.name): r for r in requirements if r.marker is None or r.marker.evaluate()}


def no_deps_requirements(path: str | Path | None = None) -> list[str]:
    """``[tool.medquant.install] no-deps``: installed without their own requirements (they would
    replace the CPU PyTorch), e.g. nnU-Net's network package."""
    import tomllib

    path = Path(path) if path is not None else paths.pyproject_file()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return list(data.get("tool", {}).get("medquant", {}).get("install", {}).get("no-deps", []))


@dataclass
class DependencyReport:
    """What is missing for one purpose. ``to_install`` holds requirement strings; ``to_install_no_deps``
    those installed with ``--no-deps``."""

    purpose: str
    to_install: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)
    slicer_mismatch: list[str] = field(default_factory=list)
    to_install_no_deps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.to_install and not self.to_install_no_deps and not self.slicer_mismatch

    @property
    def missing(self) -> list[str]:
        return list(self.to_install)

    def message(self) -> str:
        if self.ok:
            return f"Python packages ({self.purpose}): all present"
        parts = []
        if self.to_install or self.to_install_no_deps:
            parts.append("missing or too old: " + ", ".join(self.to_install + self.to_install_no_deps))
        if self.slicer_mismatch:
            parts.append("provided by Slicer, not replaced: " + ", ".join(self.slicer_mismatch))
        return f"Python packages ({self.purpose}) " + "; ".join(parts)


def _installed(name: str, version_of: VersionOf) -> str | None:
    try:
        return version_of(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(
    purpose: str = "build",
    version_of: VersionOf = importlib.metadata.version,
    pyproject: str | Path | None = None,
) -> DependencyReport:
    """Compare the installed distributions with the list (all of it, or :data:`RUN_ONLY` for ``run``)."""
    from packaging.requirements import Requirement

    listed = requirements_from_pyproject(pyproject)
    names = list(RUN_ONLY) if purpose == "run" else list(listed)
    report = DependencyReport(purpose)
    for name in names:
        requirement = listed[name]
        version = _installed(requirement.name, version_of)
        satisfied = version is not None and requirement.specifier.contains(version, prereleases=True)
        if satisfied:
            continue
        if name in SLICER_PROVIDES:
            found = version or "not installed"
            report.slicer_mismatch.append(f"{requirement} (Slicer has {found})")
            continue
        if version is not None:
            report.outdated.append(f"{requirement.name} {version}")
        report.to_install.append(str(requirement))
    if purpose != "run":
        for text in no_deps_requirements(pyproject):
            requirement = Requirement(text)
            version = _installed(requirement.name, version_of)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                report.to_install_no_deps.append(text)
    return report


def slicer_constraints(version_of: VersionOf = importlib.metadata.version) -> list[str]:
    """``name==version`` for every Slicer-provided package that is installed (pip ``-c`` lines)."""
    pins = []
    for name in SLICER_PROVIDES:
        version = _installed(name, version_of)
        if version is not None:
            pins.append(f"{name}=={version}")
    return pins


def torch_pip_arguments(requirement: str, platform: str = sys.platform) -> list[str]:
    """pip arguments for PyTorch without the PyTorch extension: the CPU build where one exists."""
    if platform == "darwin":
        return [requirement]
    return [requirement, "--index-url", TORCH_CPU_INDEX]


def install(
    report: DependencyReport,
    confirm: Callable[[str], bool],
    slicer: Any = None,
    version_of: VersionOf = importlib.metadata.version,
) -> bool:
    """Install ``report.to_install`` into Slicer's Python if ``confirm(question)`` agrees.

    Returns False when the user declined. ``slicer`` is the ``slicer`` module (looked up when None).
    """
    wanted = report.to_install + report.to_install_no_deps
    if not wanted:
        return True
    question = (
        "MedQuantSlicer needs these Python packages:\n  "
        + "\n  ".join(wanted)
        + "\n\nInstall them into Slicer's Python now? This downloads from the Python Package Index "
        "and can take several minutes. Slicer's own numpy, SimpleITK, scipy and pydicom stay as they are."
    )
    if not confirm(question):
        return False
    if slicer is None:
        import slicer  # noqa: PLC0415 - only inside the application
    torch = [r for r in report.to_install if canonical(_name(r)) == "torch"]
    rest = [r for r in report.to_install if r not in torch]
    with tempfile.TemporaryDirectory(prefix="medquant-pip-") as folder:
        constraints = Path(folder) / "slicer-constraints.txt"
        constraints.write_text("\n".join(slicer_constraints(version_of)) + "\n", encoding="utf-8")
        if torch:
            _install_torch(slicer, torch[0], constraints)
        if rest:
            _pip(slicer, rest, constraints)
        if report.to_install_no_deps:
            _pip(slicer, ["--no-deps", *report.to_install_no_deps], constraints)
    return True


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def _install_torch(slicer: Any, requirement: str, constraints: Path) -> None:
    """Through the PyTorch extension when installed (it picks a build for the machine), else the CPU wheel."""
    try:
        pytorch_utils = importlib.import_module("PyTorchUtils")
    except ImportError:
        pytorch_utils = None
    if pytorch_utils is not None:
        specifier = requirement[len(_name(requirement)) :]
        pytorch_utils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, forceComputationBackend="cpu", torchVersionRequirement=specifier
        )
        return
    _pip(slicer, torch_pip_arguments(requirement), constraints)


def _pip(slicer: Any, arguments: list[str], constraints: Path) -> None:
    ensure = _pip_ensure(slicer)
    if ensure is not None and not any(a.startswith("--") for a in arguments):
        ensure(arguments, constraints=str(constraints), prompt_install=False, requester="MedQuantSlicer")
    elif hasattr(slicer.util, "pip_install"):
        slicer.util.pip_install(["-c", str(constraints), *arguments])
    else:  # pragma: no cover - every supported Slicer has one of the two
        raise RuntimeError("this Slicer has neither slicer.packaging.pip_ensure nor slicer.util.pip_install")


def _pip_ensure(slicer: Any) -> Callable[..., object] | None:
    """``slicer.packaging.pip_ensure`` (Slicer 5.12+), else ``None``."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is None and isinstance(slicer, types.ModuleType):
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            return None
    return getattr(packaging, "pip_ensure", None)
