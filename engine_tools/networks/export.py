"""FP32 ONNX of a card's network: export (cached, atomic), validation and I/O renaming.

Every engine starts from this file: input ``input`` ``[batch, C, D, H, W]``, output ``logits``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from engine_tools.cache import atomic_file, cache_dir, key_lock, sha256_file, sha256_json
from engine_tools.networks.files import NetworkError, card_file, network_files
from engine_tools.progress import Progress, SilentProgress
from engine_tools.registry import ModelCard
from engine_tools.weights import WeightsUnavailable, ensure_weights

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def exporter_version() -> str:
    """The installed PyTorch version (part of the export key), read without importing PyTorch."""
    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def _weights_fingerprint(files: dict[str, Path] | None) -> dict[str, str]:
    return {name: sha256_file(path) for name, path in sorted((files or {}).items())}


def export_key(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> str:
    """Cache key of an export: network spec, window, weights content, exporter versions."""
    return sha256_json(
        {
            "network": card.network,
            "window": list(card.window_size),
            "in_channels": card.in_channels,
            "weights": _weights_fingerprint(files),
            "random_weights": random_weights,
            "torch": exporter_version(),
            "opset": ONNX_OPSET,
        }
    )


def validate_onnx(path: str | Path) -> dict[str, Any]:
    """Check an ONNX file (``onnx.checker``, one rank-5 float input); returns its I/O names and shapes."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise NetworkError(f"{path}: not a valid ONNX model ({exc})") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]

    def dims(value: Any) -> list[int | str]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim
        ]

    if len(inputs) != 1:
        raise NetworkError(f"{path}: expected one input (N, C, D, H, W), found {[i.name for i in inputs]}")
    shape = dims(inputs[0])
    if len(shape) != 5:
        raise NetworkError(
            f"{path}: input {inputs[0].name!r} has rank {len(shape)} {shape}; a 3-D network needs rank 5"
        )
    if not model.graph.output:
        raise NetworkError(f"{path}: the model has no output")
    return {
        "input": inputs[0].name,
        "input_shape": shape,
        "outputs": [o.name for o in model.graph.output],
        "output_shape": dims(model.graph.output[0]),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }


def _renamed_onnx(source: Path, destination: Path, info: dict[str, Any]) -> Path:
    """Copy of ``source`` whose input/first output are named ``input``/``logits`` (atomic write)."""
    import onnx

    return _save_renamed(onnx.load(str(source)), info, destination)


def _save_renamed(model: Any, info: dict[str, Any], destination: Path) -> Path:
    """Name ``model``'s input/first output ``input``/``logits``, check it, write it atomically."""
    import onnx

    renames = {info["input"]: INPUT_NAME, info["outputs"][0]: OUTPUT_NAME}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.name = renames.get(value.name, value.name)
    onnx.checker.check_model(model)
    with atomic_file(destination) as stream:
        stream.write(model.SerializeToString())
    return destination


def _published_onnx(card: ModelCard, source: Path, destination: Path) -> Path:
    """The publisher's FP32 ONNX made ready for every engine (atomic write to ``destination``).

    Checked against the card (one rank-5 input with its channels and window; logits with its classes),
    initializers removed from the graph inputs (the file was exported with
    ``keep_initializers_as_inputs=True``, which engines would read as extra inputs), I/O renamed to
    ``input``/``logits``, and a fixed batch size recorded in the metadata (``medquant.batch``).
    """
    import onnx

    info = validate_onnx(source)
    model = onnx.load(str(source))
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [value for value in model.graph.input if value.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    expected = [card.in_channels, *card.window_size]
    fixed = [d for d in info["input_shape"][1:] if isinstance(d, int)]
    if len(fixed) == 4 and fixed != expected:
        raise NetworkError(
            f"{source}: published ONNX input is {info['input_shape']}, the card expects [N, {expected}]"
        )
    classes = info["output_shape"][1] if len(info["output_shape"]) == 5 else None
    if isinstance(classes, int) and classes > 0 and classes != card.num_classes:
        raise NetworkError(f"{source}: published ONNX gives {classes} classes, the card {card.num_classes}")
    batch = info["input_shape"][0]
    if isinstance(batch, int) and batch > 0:
        if int(card.window.get("batch", 1)) > batch:
            raise NetworkError(
                f"{source}: the ONNX input has a fixed batch of {batch}; set window.batch <= {batch}"
            )
        onnx.helper.set_model_props(model, {"medquant.batch": str(batch), "medquant.source": source.name})
    return _save_renamed(model, info, destination)


def _published_onnx_export(
    card: ModelCard, weights_dir: str | Path | None, progress: Progress, rebuild: bool = False
) -> Path:
    """Export of a card whose published weights are an FP32 ONNX (``network.published_onnx``)."""
    name = card.network["published_onnx"]["file"]
    try:
        files = ensure_weights(card, weights_dir, progress=progress)
    except WeightsUnavailable as exc:
        raise WeightsUnavailable(
            f"{card.id}: the publisher's weights are an FP32 ONNX file ({name}) and it is not here. {exc}"
        ) from exc
    if name not in files:
        raise NetworkError(
            f"{card.path or card.id}: network.published_onnx.file {name!r} is not among weights.files"
        )
    target = cache_dir("exports") / f"{card.id}-{export_key(card, files, False)[:16]}.onnx"

    def prepare() -> None:
        progress.update("export", 0.5, f"{card.id}: preparing the published ONNX {name}")
        _published_onnx(card, files[name], target)

    _cached_export(target, prepare, progress, rebuild)
    progress.update("export", 1.0, f"{card.id}: published ONNX ready ({target.name})")
    return target


def _fix_spatial_dims(data: bytes, window: tuple[int, int, int]) -> bytes:
    """Set the spatial dims of input/logits to ``window`` (exported with dynamic spatial axes)."""
    import onnx

    model = onnx.load_from_string(data)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 5:
            for axis, size in zip((2, 3, 4), window, strict=True):
                dims[axis].Clear()
                dims[axis].dim_value = int(size)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _hash_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _record_hash(target: Path) -> Path:
    """Record the SHA-256 of a finished export beside it (checked by :func:`_usable_export`)."""
    with atomic_file(_hash_file(target), "w") as stream:
        stream.write(sha256_file(target) + "\n")
    return target


def _cached_export(target: Path, produce: Callable[[], object], progress: Progress, rebuild: bool) -> bool:
    """Make ``target`` with ``produce()`` and record its SHA-256, unless a usable export is cached;
    returns whether it was found. Held under the target's :func:`key_lock`, so a concurrent build never
    sees an export whose hash is not yet recorded (and removes it) and two builds export it once."""
    with key_lock(target):
        if _usable_export(target, progress, rebuild):
            return True
        produce()
        _record_hash(target)
        return False


def _usable_export(target: Path, progress: Progress, rebuild: bool = False) -> bool:
    """Whether a cached export exists and still has its recorded SHA-256. A truncated or changed file
    (or one without a record) is removed with a warning so that it is exported again; ``rebuild``
    removes it unconditionally."""
    if not target.is_file():
        return False
    problem = "a rebuild was asked for" if rebuild else None
    if problem is None:
        try:
            recorded = _hash_file(target).read_text().strip()
        except OSError:
            recorded = ""
        if not recorded:
            problem = "no SHA-256 was recorded for it (interrupted export?)"
        elif recorded != sha256_file(target):
            problem = "its SHA-256 differs from the one recorded at export (truncated or changed)"
    if problem is None:
        return True
    if not rebuild:
        progress.warning(f"cached ONNX export {target.name} is not usable: {problem}; exporting it again")
    target.unlink(missing_ok=True)
    _hash_file(target).unlink(missing_ok=True)
    return False


def export_onnx(
    card: ModelCard,
    weights_dir: str | Path | None = None,
    random_weights: bool = False,
    progress: Progress | None = None,
    rebuild: bool = False,
) -> Path:
    """FP32 ONNX of the card's network, cached under ``<cache>/exports`` (atomic).

    Input ``input`` ``[batch, C, *window]``, output ``logits`` ``[batch, K, *window]``, dynamic batch,
    opset 17 (TorchScript exporter). Keyed by the network spec and the weights' SHA-256. BYO ONNX
    cards: the validated user file (a renamed copy in the cache if its I/O names differ). Cards whose
    publisher gives an FP32 ONNX (``network.published_onnx``) use it as the export (see
    :func:`_published_onnx`); their builder serves random-weight runs only. A cached export is used
    only if its recorded SHA-256 still matches (:func:`_usable_export`); ``rebuild`` exports again.
    """
    progress = progress or SilentProgress()
    fmt = card.network.get("format")
    if fmt == "onnx":
        files = ensure_weights(card, weights_dir, progress=progress)
        source = card_file(card, files)
        info = validate_onnx(source)
        if info["input"] == INPUT_NAME and info["outputs"][0] == OUTPUT_NAME:
            return source
        target = cache_dir("exports") / f"{card.id}-{export_key(card, files, False)[:16]}.onnx"
        _cached_export(target, lambda: _renamed_onnx(source, target, info), progress, rebuild)
        return target
    if card.network.get("published_onnx") and not random_weights:
        return _published_onnx_export(card, weights_dir, progress, rebuild)
    progress.update("export", 0.0, f"{card.id}: preparing weights")
    files = network_files(card, weights_dir, random_weights, progress)
    target = cache_dir("exports") / f"{card.id}-{export_key(card, files, random_weights)[:16]}.onnx"
    export = functools.partial(_export_module, card, files, random_weights, target, progress)
    if _cached_export(target, export, progress, rebuild):
        progress.update("export", 1.0, f"{card.id}: ONNX export found in cache")
    else:
        progress.update("export", 1.0, f"{card.id}: exported {target.name}")
    return target


def _export_module(
    card: ModelCard, files: dict[str, Path], random_weights: bool, target: Path, progress: Progress
) -> None:
    """Trace the card's PyTorch network to ONNX and write it atomically to ``target``."""
    import torch

    from engine_tools.networks.loaders import module_from_files

    module = module_from_files(card, files, random_weights)
    window = card.window_size
    # Pure convolution stacks (TF.js MeshNets) trace identically at any size: export with a small
    # dummy (tracing runs one forward pass) and set the card's window afterwards.
    small = card.network.get("format") == "tfjs"
    trace_shape = (16, 16, 16) if small else window
    dummy = torch.zeros(1, card.in_channels, *trace_shape)
    axes = {0: "batch", **({2: "depth", 3: "height", 4: "width"} if small else {})}
    progress.update("export", 0.2, f"{card.id}: exporting to ONNX (opset {ONNX_OPSET})")
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    data = _fix_spatial_dims(buffer.getvalue(), window) if small else buffer.getvalue()
    with atomic_file(target) as stream:
        stream.write(data)
