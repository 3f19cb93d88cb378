"""Building a TensorRT plan: optimization profile, workspace, timing cache and builder configuration.

The decisions (profile shapes, workspace size, timing-cache file and its bookkeeping, TF32) are small
functions over plain values or over the documented TensorRT interfaces they touch, so they are tested
without TensorRT; :func:`build_plan` strings them together with the real builder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from engine_tools.cache import atomic_file, cache_dir
from engine_tools.engines.tensorrt.meta import version_features

GIB = 2**30
#: Device memory left out of the default workspace (for PyTorch, the CUDA context and other engines):
#: the larger of this many GiB and :data:`WORKSPACE_MARGIN_FRACTION` of the device memory.
WORKSPACE_MARGIN_GIB = 2.0
WORKSPACE_MARGIN_FRACTION = 0.1


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile for the network input, and the batch the runner must feed."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    batch: int
    static_batch: bool
    needs_profile: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }


def profile_shapes(
    network_shape: Sequence[int], channels: int, window: Sequence[int], batch: int
) -> ProfileShapes:
    """Profile for an ``N, C, D, H, W`` input whose dimensions read from the parsed network are
    ``network_shape`` (``-1`` where dynamic), given the card's channels and window and the wanted batch.

    A static channel or spatial dimension must equal the card's, else a :class:`ValueError` says which.
    A static batch is kept (min = opt = max must equal it): the plan runs that batch and the runner pads
    the last chunk, so a bring-your-own ONNX exported with batch 2 still works; the note says so.
    """
    dims = [int(d) for d in network_shape]
    if len(dims) != 5:
        raise ValueError(f"TensorRT input must be 5-D (N, C, D, H, W); the ONNX input has shape {dims}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    wanted = (int(channels), *(int(w) for w in window))
    for axis, (got, want) in enumerate(zip(dims[1:], wanted, strict=True), start=1):
        if got != -1 and got != want:
            label = "channels" if axis == 1 else f"spatial dimension {axis - 2}"
            raise ValueError(
                f"the ONNX input fixes {label} at {got} but the model card asks for {want} "
                f"(input {dims}, card: {channels} channels, window {list(window)}); set the card's "
                "window/channels to the ONNX's, or export the ONNX with those dimensions dynamic"
            )
    needs_profile = any(d == -1 for d in dims)
    if dims[0] == -1:
        return ProfileShapes((1, *wanted), (batch, *wanted), (batch, *wanted), batch, False, needs_profile)
    static = dims[0]
    note = ""
    if static != batch:
        note = (
            f"the ONNX fixes the batch at {static}; the engine runs {static} windows per call "
            f"(requested {batch}), padding the last call"
        )
    shape = (static, *wanted)
    return ProfileShapes(shape, shape, shape, static, True, needs_profile, note)


def workspace_bytes(
    total_memory: int, workspace_gib: float | None = None, margin_gib: float | None = None
) -> int:
    """Workspace limit: ``workspace_gib`` when given, else the device memory minus a margin
    (``margin_gib``, default the larger of :data:`WORKSPACE_MARGIN_GIB` and 10 % of the memory)."""
    if workspace_gib is not None:
        if workspace_gib <= 0:
            raise ValueError(f"workspace_gib must be positive, got {workspace_gib}")
        return int(workspace_gib * GIB)
    margin = (
        margin_gib
        if margin_gib is not None
        else max(WORKSPACE_MARGIN_GIB, WORKSPACE_MARGIN_FRACTION * total_memory / GIB)
    )
    free = int(total_memory - margin * GIB)
    if free <= 0:
        raise ValueError(
            f"the GPU has {total_memory / GIB:.1f} GiB; a {margin:.1f} GiB margin leaves no workspace "
            "(set workspace_gib or a smaller workspace_margin_gib)"
        )
    return free


def timing_cache_path(tensorrt_version: str, compute_capability: str, folder: Path | None = None) -> Path:
    """One timing-cache file per TensorRT version and GPU architecture (tactic timings do not carry
    across either)."""
    arch = "sm" + str(compute_capability).replace(".", "")
    return (folder or cache_dir("tensorrt")) / f"timing-trt{tensorrt_version}-{arch}.cache"


def _lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")


def attach_timing_cache(config: Any, path: Path) -> dict[str, Any]:
    """Give the builder ``config`` the timing cache stored at ``path`` (or an empty one).

    ``config`` is an ``IBuilderConfig``: ``create_timing_cache(bytes)`` returns an ``ITimingCache`` or
    ``None``; ``set_timing_cache(cache, ignore_mismatch)`` returns whether it was accepted. A stored cache
    TensorRT refuses is replaced by an empty one, and the result says the cache was not reused.
    """
    with _lock(path):
        stored = path.read_bytes() if path.is_file() else b""
    if stored:
        cache = config.create_timing_cache(stored)
        if cache is not None and config.set_timing_cache(cache, False):
            return {"timing_cache": str(path), "timing_cache_reused": True}
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise RuntimeError("TensorRT could not create an empty timing cache")
    result: dict[str, Any] = {"timing_cache": str(path), "timing_cache_reused": False}
    if stored:
        result["timing_cache_note"] = f"{path.name} was refused by TensorRT and will be replaced"
    return result


def save_timing_cache(config: Any, path: Path) -> bool:
    """Write the builder's timing cache to ``path``, merged with what other builders stored meanwhile
    (``ITimingCache.combine``), under a file lock and atomically. False when the builder has none."""
    cache = config.get_timing_cache()
    if cache is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        if path.is_file():
            stored = config.create_timing_cache(path.read_bytes())
            if stored is not None:
                cache.combine(stored, False)  # a refused (mismatched) file is simply overwritten
        with atomic_file(path) as stream:
            stream.write(bytes(cache.serialize()))
    return True


#: Precision → whether ``BuilderFlag.TF32`` is set. TensorRT enables TF32 by default; an "fp32" engine
#: clears it (as Polygraphy does) so FP32 means IEEE FP32; "tf32" is its own, faster, row.
TF32_FLAG = {"fp32": False, "tf32": True}


def build_plan(
    trt: Any,
    onnx_file: Path,
    *,
    precision: str,
    channels: int,
    window: Sequence[int],
    batch: int,
    options: dict[str, Any],
    total_memory: int,
    compute_capability: str,
) -> tuple[bytes, dict[str, Any]]:
    """Parse ``onnx_file`` into a strongly-typed network and build a serialized plan."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # 10.x: opt in; 11.x: strongly typed is the only mode
        flags |= 1 << int(strongly_typed)
    elif version_features(trt.__version__)["needs_strongly_typed_flag"]:
        raise RuntimeError(f"TensorRT {trt.__version__} lacks NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file.name}: {errors}")
    config = builder.create_builder_config()
    workspace = workspace_bytes(
        total_memory, options.get("workspace_gib"), options.get("workspace_margin_gib")
    )
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if precision in TF32_FLAG:
        (config.set_flag if TF32_FLAG[precision] else config.clear_flag)(trt.BuilderFlag.TF32)
    if "optimization_level" in options:
        config.builder_optimization_level = int(options["optimization_level"])
    input_tensor = network.get_input(0)
    shapes = profile_shapes(tuple(input_tensor.shape), channels, window, batch)
    if shapes.needs_profile:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_tensor.name, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(profile)
    cache_file = timing_cache_path(trt.__version__, compute_capability)
    cache_log = attach_timing_cache(config, cache_file)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file.name} (see the log above)")
    save_timing_cache(config, cache_file)
    return bytes(plan), {
        "strongly_typed": True,
        "tf32": TF32_FLAG.get(precision, True),
        "workspace_gib": round(workspace / GIB, 2),
        **cache_log,
        "profile": shapes.to_json(),
    }
