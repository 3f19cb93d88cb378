"""Panel selections persisted in the module's parameter node (a ``vtkMRMLScriptedModuleNode``).

Plain MRML (works with ``slicer-core``): scalar settings as string parameters, the input volume and
reference segmentation as node references, so they are saved with the scene.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

INPUT_ROLE = "InputVolume"
REFERENCE_ROLE = "ReferenceSegmentation"


@dataclass
class Settings:
    model: str = ""
    calibration_folder: str = ""
    windows: int = 32
    method: str = "minmax"
    backend: str = "auto"
    precision: str = "int8"
    rebuild: bool = False
    offline: bool = False
    compare_fp32: bool = False
    replace_previous: bool = False
    card_dirs: str = ""

    def to_parameters(self) -> dict[str, str]:
        return {
            k: ("true" if v is True else "false" if v is False else str(v)) for k, v in asdict(self).items()
        }

    @classmethod
    def from_parameters(cls, values: dict[str, str]) -> Settings:
        settings = cls()
        for f in fields(cls):
            if f.name not in values or values[f.name] == "":
                continue
            raw = values[f.name]
            default = getattr(settings, f.name)
            if isinstance(default, bool):
                setattr(settings, f.name, raw.lower() == "true")
            elif isinstance(default, int):
                try:
                    setattr(settings, f.name, int(raw))
                except ValueError:
                    pass
            else:
                setattr(settings, f.name, raw)
        return settings


def save(node: Any, settings: Settings, input_node: Any = None, reference_node: Any = None) -> None:
    """Write ``settings`` and the selected nodes into the parameter node (one Modified event)."""
    disabled = node.StartModify()
    for key, value in settings.to_parameters().items():
        node.SetParameter(key, value)
    node.SetNodeReferenceID(INPUT_ROLE, input_node.GetID() if input_node else None)
    node.SetNodeReferenceID(REFERENCE_ROLE, reference_node.GetID() if reference_node else None)
    node.EndModify(disabled)


def load(node: Any) -> tuple[Settings, Any, Any]:
    """``(settings, input volume node or None, reference segmentation node or None)``."""
    values = {f.name: node.GetParameter(f.name) or "" for f in fields(Settings)}
    return (
        Settings.from_parameters(values),
        node.GetNodeReference(INPUT_ROLE),
        node.GetNodeReference(REFERENCE_ROLE),
    )


def parameter_node(scene: Any, module_name: str = "MedQuantSlicer") -> Any:
    """The module's singleton parameter node in ``scene``, created on first use.

    Same lookup as Slicer's ``ScriptedLoadableModuleLogic.getParameterNode()``
    (Base/Python/slicer/ScriptedLoadableModule.py): by singleton tag, not by the ``ModuleName``
    attribute, which a scene close erases while the singleton node stays in the scene. The node is
    returned from ``AddNode``, which hands back the node that is actually in the scene.
    """
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is not None:
        if not node.GetAttribute("ModuleName"):
            node.SetAttribute("ModuleName", module_name)
        return node
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)  # CreateNodeByClass returns a new reference, as in Slicer's template
    node.SetSingletonTag(module_name)
    node.SetName(scene.GenerateUniqueName(module_name))
    node.SetAttribute("ModuleName", module_name)
    return scene.AddNode(node)
