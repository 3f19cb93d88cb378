"""TensorRT engine metadata: what a serialized engine was built for, and whether it may be loaded here.

A TensorRT plan only runs on the GPU architecture and TensorRT version that built it. Every engine
is saved with a ``trt_meta.json`` beside it; :func:`check_compatibility` compares that record with the
current machine *before* deserializing, so a stale cache gives a clear message instead of a TensorRT
error. Everything here is pure Python (no TensorRT import) so it is tested on stored files anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

META_FILE = "trt_meta.json"
META_SCHEMA = 1
REQUIRED = (
    "schema",
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
    "precision",
    "model_sha256",
    "engine_sha256",
)


class EngineMismatch(RuntimeError):
    """A cached TensorRT engine was built elsewhere; the message says what differs and how to rebuild."""


@dataclass
class EngineMeta:
    """What one serialized engine was built from and for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    model_sha256: str
    engine_sha256: str
    calibration_sha256: str | None = None
    onnx_kind: str = "fp32"  # fp32 | fp16 (AutoCast) | qdq (ModelOpt)
    strongly_typed: bool = True
    batch: int = 1
    static_batch: bool = False  # the ONNX fixes the batch: the runner pads the last call to ``batch``
    window: tuple[int, int, int] | None = None
    schema: int = META_SCHEMA

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["window"] = list(self.window) if self.window else None
        return data


def read_meta(path: str | Path) -> dict[str, Any]:
    """Load and validate a metadata file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise EngineMismatch(f"{path}: engine metadata missing; rebuild the engine (rebuild=True)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EngineMismatch(
            f"{path}: engine metadata is not valid JSON ({exc}); rebuild the engine"
        ) from exc
    if not isinstance(data, dict):
        raise EngineMismatch(f"{path}: engine metadata must be a JSON object")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise EngineMismatch(f"{path}: engine metadata lacks {', '.join(missing)}; rebuild the engine")
    if data["schema"] != META_SCHEMA:
        raise EngineMismatch(f"{path}: engine metadata schema {data['schema']} is not {META_SCHEMA}; rebuild")
    return data


def major_minor(version: str) -> tuple[int, int]:
    """``"10.13.3.9"`` → ``(10, 13)``."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise ValueError(f"not a TensorRT version: {version!r}") from exc


def mismatches(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences that make ``stored`` unusable on ``current``.

    ``current`` holds ``tensorrt_version``, ``gpu_name``, ``compute_capability`` and optionally
    ``precision``, ``model_sha256`` and ``calibration_sha256`` (what the caller asks for). TensorRT plans
    are tied to the exact TensorRT build (any version change refuses) and to the GPU's compute
    capability; a different GPU model of the same capability is also refused, since tactics were timed
    on the builder's GPU (the plan may run but slower, and TensorRT warns).
    """
    problems = []
    if str(stored["tensorrt_version"]) != str(current["tensorrt_version"]):
        problems.append(
            f"built with TensorRT {stored['tensorrt_version']}, this is TensorRT {current['tensorrt_version']}"
        )
    if str(stored["compute_capability"]) != str(current["compute_capability"]):
        problems.append(
            f"built for compute capability {stored['compute_capability']} ({stored['gpu_name']}), "
            f"this GPU is {current['compute_capability']} ({current['gpu_name']})"
        )
    elif stored["gpu_name"] != current["gpu_name"]:
        problems.append(f"built on {stored['gpu_name']}, this GPU is {current['gpu_name']}")
    for key, label in (
        ("precision", "precision"),
        ("model_sha256", "model (ONNX hash)"),
        ("calibration_sha256", "calibration set"),
    ):
        if current.get(key) is not None and stored.get(key) != current[key]:
            problems.append(
                f"{label} differs: engine {stored.get(key)!s:.16}, requested {current[key]!s:.16}"
            )
    return problems


def check_compatibility(meta_path: str | Path, current: dict[str, Any]) -> dict[str, Any]:
    """Return the stored metadata if the engine fits ``current``, else raise :class:`EngineMismatch`."""
    stored = read_meta(meta_path)
    problems = mismatches(stored, current)
    if problems:
        raise EngineMismatch(
            f"{meta_path}: cached TensorRT engine cannot be used here: {'; '.join(problems)}. "
            "Rebuild it on this machine (prepare_engine(..., rebuild=True) or `medquant build --rebuild`)."
        )
    return stored


def version_features(version: str) -> dict[str, bool]:
    """API differences between TensorRT 10.x and 11.x that the engine code branches on.

    * 10.x: networks are weakly typed unless ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is passed;
      ``BuilderFlag.FP16/INT8`` exist (deprecated) and are never used here.
    * 11.x: strongly typed is the only mode (the flag is gone or a no-op); the weak-typing builder
      flags and implicit INT8 calibrators are removed.
    """
    major, minor = major_minor(version)
    return {
        "supported": major in (10, 11),
        "needs_strongly_typed_flag": major == 10,
        "has_weak_typing_flags": major == 10,
        "has_engine_inspector": (major, minor) >= (8, 2),
    }


_PRECISION_WORDS = (("int8", "int8"), ("fp8", "fp8"), ("half", "fp16"), ("fp16", "fp16"), ("bf16", "bf16"))
_PRECISION_WORDS += (("float", "fp32"), ("fp32", "fp32"), ("int32", "int32"), ("bool", "bool"))
TRANSPOSED_CONV_ISSUE = (
    "ConvTranspose3d layers stay FP16 under explicit Q/DQ in TensorRT (NVIDIA/TensorRT#4668, "
    "NVIDIA/Model-Optimizer#688): their time and size do not shrink in the INT8 engine"
)


#: What ``IEngineInspector`` writes for a tensor format when the input shape is not set on an attached
#: execution context and the network input is dynamic.
DYNAMIC_SHAPES_FORMAT = "N/A due to dynamic shapes"
UNRESOLVED = "unresolved"


def _precision_of(description: str) -> str:
    if DYNAMIC_SHAPES_FORMAT.lower() in description.lower():
        return UNRESOLVED
    text = description.lower()
    for word, precision in _PRECISION_WORDS:
        if word in text:
            return precision
    return "unknown"


def layer_precisions(inspector_info: dict[str, Any] | str) -> list[dict[str, Any]]:
    """Per-layer precision from ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    With ``ProfilingVerbosity.DETAILED`` each layer has ``Name``, ``LayerType`` and ``Inputs``/``Outputs``
    whose ``Format/Datatype`` strings name the type ("Channel major FP16 format ...", "Int8 ...").
    The layer's compute precision is taken from its first input (weights of Q/DQ-fused convolutions are
    INT8 when the input is). Layers given only as strings (``ProfilingVerbosity.LAYER_NAMES_ONLY``) are
    reported as ``unknown``; formats reading :data:`DYNAMIC_SHAPES_FORMAT` (inspector without an
    execution context) as ``unresolved``.
    """
    if isinstance(inspector_info, str):
        inspector_info = json.loads(inspector_info)
    layers = []
    for layer in inspector_info.get("Layers", []):
        if isinstance(layer, str):
            layers.append({"name": layer, "type": "unknown", "precision": "unknown", "output": "unknown"})
            continue
        inputs = [t for t in layer.get("Inputs", []) if isinstance(t, dict)]
        outputs = [t for t in layer.get("Outputs", []) if isinstance(t, dict)]
        first_in = _precision_of(inputs[0].get("Format/Datatype", "")) if inputs else "unknown"
        first_out = _precision_of(outputs[0].get("Format/Datatype", "")) if outputs else "unknown"
        layers.append(
            {
                "name": layer.get("Name", "?"),
                "type": layer.get("LayerType", "unknown"),
                "precision": first_in,
                "output": first_out,
                "tactic": layer.get("TacticName", ""),
            }
        )
    return layers


def summarize_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by precision, and the transposed convolutions known to be left in higher precision
    (TensorRT#4668); layers of unknown precision are never reported as such."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["precision"]] = counts.get(layer["precision"], 0) + 1
    transposed = [
        layer["name"]
        for layer in layers
        if ("deconv" in layer["type"].lower() or "convtranspose" in layer["name"].lower().replace("_", ""))
        and layer["precision"] not in ("int8", UNRESOLVED, "unknown")
    ]
    summary: dict[str, Any] = {"layers": len(layers), "by_precision": counts}
    if counts.get(UNRESOLVED):
        summary["unresolved_warning"] = (
            f"{counts[UNRESOLVED]} layers read '{DYNAMIC_SHAPES_FORMAT}': the engine inspector had no "
            "execution context with the input shape set, so their precision is not known"
        )
    if transposed:
        summary["transposed_conv_not_int8"] = transposed
        summary["warning"] = TRANSPOSED_CONV_ISSUE
    return summary
