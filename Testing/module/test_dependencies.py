"""The module's dependency check and installer: one list (pyproject.toml), versions checked, Slicer's
own numpy/SimpleITK/scipy/pydicom never replaced, torch through PyTorchUtils or the CPU index."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
import types

import pytest
from MedQuantSlicerLib import dependencies, paths
from mrml_helpers import REPO


def _listed_names() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    from packaging.requirements import Requirement

    return {dependencies.canonical(Requirement(r).name) for r in data["project"]["dependencies"]}


def test_the_list_is_pyproject():
    assert paths.pyproject_file() == REPO / "pyproject.toml"
    listed = dependencies.requirements_from_pyproject()
    assert set(listed) == _listed_names()
    assert set(dependencies.RUN_ONLY) <= set(listed) and set(dependencies.SLICER_PROVIDES) - {"scipy"} <= set(
        listed
    )
    report = dependencies.check("build")
    assert report.ok, report.message()  # this environment installed exactly that list


def test_versions_are_checked_not_only_presence():
    real = importlib.metadata.version

    def old_monai_and_slicer_numpy(name: str) -> str:
        if dependencies.canonical(name) == "monai":
            return "1.0.0"  # importable (find_spec finds it) but older than the list allows
        if dependencies.canonical(name) == "numpy":
            return "1.20.0"  # Slicer's numpy: reported, never replaced
        if dependencies.canonical(name) == "onnxruntime":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    report = dependencies.check("build", version_of=old_monai_and_slicer_numpy)
    assert any(r.startswith("monai") for r in report.to_install)
    assert any(r.startswith("onnxruntime") for r in report.to_install)
    assert report.outdated == ["monai 1.0.0"]
    assert not any(r.lower().startswith("numpy") for r in report.to_install)
    assert any("numpy" in m and "1.20.0" in m for m in report.slicer_mismatch)
    run = dependencies.check("run", version_of=old_monai_and_slicer_numpy)
    assert run.to_install == [] and not any("monai" in m for m in run.message().split())


class _RecordingSlicer(types.SimpleNamespace):
    """The two installer entry points Slicer offers, recording what they receive."""

    def __init__(self, with_pip_ensure: bool) -> None:
        calls: list[tuple[str, object, dict]] = []
        util = types.SimpleNamespace(pip_install=lambda args: calls.append(("pip_install", list(args), {})))
        packaging = None
        if with_pip_ensure:
            packaging = types.SimpleNamespace(
                pip_ensure=lambda reqs, **kw: calls.append(("pip_ensure", list(reqs), kw))
            )
        super().__init__(util=util, packaging=packaging, calls=calls)


@pytest.mark.parametrize("with_pip_ensure", [False, True], ids=["slicer-5.10", "slicer-5.12"])
def test_install_keeps_slicer_packages_and_uses_cpu_torch(monkeypatch, with_pip_ensure):
    monkeypatch.delitem(sys.modules, "PyTorchUtils", raising=False)
    report = dependencies.DependencyReport("build", to_install=["torch>=2.4", "monai>=1.4", "nncf>=2.14"])
    slicer = _RecordingSlicer(with_pip_ensure)
    asked = []
    assert dependencies.install(report, lambda q: asked.append(q) or False, slicer) is False
    assert slicer.calls == [] and "monai>=1.4" in asked[0]
    assert dependencies.install(report, lambda q: True, slicer) is True
    torch_call, rest_call = slicer.calls
    assert torch_call[0] == "pip_install"  # an --index-url argument: the plain pip path
    assert "torch>=2.4" in torch_call[1] and dependencies.TORCH_CPU_INDEX in torch_call[1]
    everything = " ".join(str(a) for call in slicer.calls for a in call[1])
    for package in ("numpy", "simpleitk", "scipy", "pydicom"):
        assert package not in everything.lower().replace("-c ", "")
    if with_pip_ensure:
        assert rest_call[0] == "pip_ensure" and rest_call[1] == ["monai>=1.4", "nncf>=2.14"]
        assert rest_call[2]["prompt_install"] is False and rest_call[2]["constraints"]
    else:
        assert rest_call == ("pip_install", ["-c", rest_call[1][1], "monai>=1.4", "nncf>=2.14"], {})


def test_no_deps_packages_come_from_pyproject_and_install_without_dependencies():
    no_deps = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["medquant"]["install"]["no-deps"]
    assert dependencies.no_deps_requirements() == no_deps

    def without_them(name: str) -> str:
        if any(dependencies.canonical(name) == dependencies.canonical(r.split("=")[0]) for r in no_deps):
            raise importlib.metadata.PackageNotFoundError(name)
        return importlib.metadata.version(name)

    report = dependencies.check("build", version_of=without_them)
    assert report.to_install_no_deps == no_deps and not report.ok
    slicer = _RecordingSlicer(False)
    dependencies.install(report, lambda q: True, slicer)
    assert slicer.calls[-1][1][-1 - len(no_deps) :] == ["--no-deps", *no_deps]


def test_torch_through_pytorch_utils_when_present(monkeypatch):
    installed = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, forceComputationBackend, torchVersionRequirement):  # noqa: N802,N803
            installed.append((askConfirmation, forceComputationBackend, torchVersionRequirement))

    monkeypatch.setitem(
        sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
    )
    slicer = _RecordingSlicer(False)
    dependencies.install(
        dependencies.DependencyReport("build", to_install=["torch>=2.4"]), lambda q: True, slicer
    )
    assert installed == [(False, "cpu", ">=2.4")] and slicer.calls == []


def test_constraints_pin_what_slicer_ships():
    pins = dependencies.slicer_constraints()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"simpleitk=={importlib.metadata.version('SimpleITK')}" in pins
    assert dependencies.torch_pip_arguments("torch>=2.4", "darwin") == ["torch>=2.4"]


def test_never_slicer_pydeps():
    text = (paths.module_dir() / "MedQuantSlicerLib" / "dependencies.py").read_text()
    assert "pydeps" not in text
