"""Python packages the worker needs, checked and installed only after the user agrees.

Nothing is installed at import time. Inside Slicer, installation uses ``pip_ensure`` (Slicer 5.11+:
``slicer.pydeps.pip_ensure``; also looked up as ``slicer.packaging.pip_ensure``), which skips what is
already satisfied, or ``slicer.util.pip_install`` on older releases. SimpleITK and numpy come with Slicer and are never
reinstalled (replacing Slicer's SimpleITK breaks it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

#: import name → pip requirement (what ``engine_tools`` imports on the CPU path).
REQUIREMENTS: dict[str, str] = {
    "torch": "torch>=2.4",
    "monai": "monai>=1.4",
    "onnx": "onnx>=1.16",
    "onnxscript": "onnxscript>=0.2",
    "onnxruntime": "onnxruntime>=1.18",
    "openvino": "openvino>=2025.0",
    "nncf": "nncf>=2.14",
    "nibabel": "nibabel>=5",
    "pydicom": "pydicom>=2.4",
}
#: Shipped with Slicer: checked, never installed by this module.
PROVIDED_BY_SLICER = ("numpy", "SimpleITK")


@dataclass
class DependencyReport:
    missing: list[str]
    missing_from_slicer: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.missing_from_slicer

    def message(self) -> str:
        if self.ok:
            return "All Python packages the engines need are installed."
        parts = []
        if self.missing:
            parts.append("Missing Python packages: " + ", ".join(self.missing))
        if self.missing_from_slicer:
            parts.append(
                "Missing packages that Slicer itself should provide (reinstall Slicer): "
                + ", ".join(self.missing_from_slicer)
            )
        return "\n".join(parts)


def check(find_spec: Callable[[str], object] = importlib.util.find_spec) -> DependencyReport:
    """Which requirements are importable in this interpreter (the worker uses the same one)."""
    missing = [req for name, req in REQUIREMENTS.items() if find_spec(name) is None]
    provided = [name for name in PROVIDED_BY_SLICER if find_spec(name) is None]
    return DependencyReport(missing, provided)


def install(requirements: list[str], confirm: Callable[[str], bool]) -> bool:
    """Install ``requirements`` in Slicer's Python if ``confirm(question)`` returns True.

    Returns False when the user declined. Raises ``RuntimeError`` outside Slicer.
    """
    if not requirements:
        return True
    question = (
        "MedQuantSlicer needs these Python packages:\n  "
        + "\n  ".join(requirements)
        + "\n\nInstall them into Slicer's Python now? This downloads from the Python Package Index "
        "and can take several minutes."
    )
    if not confirm(question):
        return False
    try:
        import slicer
    except ImportError as exc:  # pragma: no cover - only meaningful in Slicer
        raise RuntimeError("installing packages is only supported inside 3D Slicer; use pip") from exc
    ensure = _pip_ensure(slicer)
    if ensure is not None:
        from packaging.requirements import Requirement

        ensure([Requirement(r) for r in requirements], requester="MedQuantSlicer")
    elif hasattr(slicer.util, "pip_install"):
        slicer.util.pip_install(requirements)
    else:  # pragma: no cover
        raise RuntimeError("this Slicer has neither slicer.packaging.pip_ensure nor slicer.util.pip_install")
    return True


def _pip_ensure(slicer: object) -> Callable[..., object] | None:
    """``pip_ensure`` of this Slicer (``slicer.pydeps`` or ``slicer.packaging``), else ``None``."""
    import importlib

    for name in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None
