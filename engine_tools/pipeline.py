"""From a model card to a loaded engine: export, calibrate, quantize, guard, compile, cache.

:func:`prepare_engine` is what ``medquant build``/``segment``/``compare`` and the Slicer module call.
Built engines live in ``<cache>/engines/<key>/`` (written through
:func:`engine_tools.cache.atomic_directory`, so a cancelled or killed build leaves nothing behind) with
``engine.json`` holding the key parts and the build report. The key covers the card, the weights, the
calibration and validation samples and the calibration method (INT8 only), the backend and its
library versions, the precision, the device and the accuracy-guard target, so any change rebuilds and
nothing stale is reused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine_tools.build_samples import calibration_samples, sample_report, with_copies
from engine_tools.cache import (
    atomic_directory,
    cache_dir,
    cache_root,
    file_hashes,
    hash_problem,
    key_lock,
    remove_stale_partials,
    sha256_file,
    sha256_json,
)
from engine_tools.calibration_store import in_memory
from engine_tools.engines import METADATA_FILE, BuildRequest, Engine, engine_class, select_backend
from engine_tools.machine import int8_speed_note
from engine_tools.progress import Progress, SilentProgress
from engine_tools.registry import ModelCard, get_card
from engine_tools.spec import EngineSpec
from engine_tools.stage_clock import StageClock

#: Bump when the artifact layout or build logic changes incompatibly (part of every cache key).
PIPELINE_VERSION = 6


def engine_key(parts: dict[str, Any]) -> str:
    return sha256_json(parts)


def cached_engines() -> list[dict[str, Any]]:
    """Metadata of every engine in the cache (for listings and tests)."""
    root = cache_dir("engines")
    found = []
    for meta in sorted(root.glob(f"*/{METADATA_FILE}")):
        try:
            found.append(json.loads(meta.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def card_build_options(card: ModelCard, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Backend build options: the card's ``quantization`` recipe (options, layers kept in higher
    precision, model type), overridden by ``options``."""
    build_options = {**dict(card.quantization.get("options", {})), **(options or {})}
    if card.quantization.get("keep_higher_precision"):
        build_options.setdefault(
            "keep_higher_precision_patterns", list(card.quantization["keep_higher_precision"])
        )
    if card.quantization.get("model_type"):
        build_options.setdefault("model_type", card.quantization["model_type"])
    return build_options


def prepare_engine(
    card: ModelCard | str,
    spec: EngineSpec | None = None,
    progress: Progress | None = None,
    **fields: Any,
) -> Engine:
    """A loaded engine for ``card`` as ``spec`` says, built (and cached) or taken from the cache.

    ``fields`` override single :class:`~engine_tools.spec.EngineSpec` fields (``precision="fp32"``,
    ``options={...}``, ...). INT8 needs ``spec.calibration``; the accuracy guard validates on
    ``spec.validation`` or, without it, on a quarter of the calibration scans held out whole (see
    :func:`engine_tools.build_samples.calibration_samples`). ``engine.describe()["cache"]`` is
    ``"hit"`` or ``"built"``. A build's
    report has ``stage_seconds`` (export, calibration sampling, the engine's and the guard's stages,
    metadata, compile; each second counted once) and ``build_seconds`` (the wall time of this call).
    """
    started = time.perf_counter()
    clock = StageClock()
    progress = progress or SilentProgress()
    spec = replace(spec or EngineSpec(), **fields)
    for stale in remove_stale_partials(cache_root()):
        progress.log(f"removed the leftover of an interrupted write: {stale}")
    if isinstance(card, str):
        card = get_card(card)
    backend, reason = select_backend(spec.backend)
    progress.log(f"backend: {reason}")
    cls = engine_class(backend)
    cls.require_available()
    engine = cls(precision=spec.precision, device=spec.device)
    if spec.precision == "int8" and spec.calibration is None:
        raise ValueError(
            f"INT8 for {card.id} needs a folder of unlabeled scans for calibration "
            "(--calibration FOLDER); or choose --precision fp32/bf16/fp16"
        )
    with progress.span(0.0, 0.15), clock.stage("export"):
        factory, onnx_path = _network(card, spec, backend, progress)
    calibration_info: dict[str, Any] = {}
    cal_samples = val_samples = None
    if spec.precision == "int8":
        with progress.span(0.15, 0.3), clock.stage("calibration_sampling"):
            progress.update("calibrate", 0.0, "holding out validation subjects")
            cal_set, val_set, calibration_info = calibration_samples(
                spec, engine, card, progress, make_copies=False
            )
            progress.update("calibrate", 1.0, f"{len(cal_set)} calibration samples")
    build_options = card_build_options(card, spec.build_options())
    key_parts = _key_parts(card, spec, engine, backend, onnx_path, calibration_info, build_options)
    if calibration_info:  # what the guard's report says it validated on (its samples are in the key)
        build_options = {**build_options, "validation_note": calibration_info["validation_note"]}
        build_options["validation_copies"] = calibration_info["validation_copies"]  # ranked without them
    if card.network.get("fully_convolutional"):  # the guard may tap a sub-crop for its sensitivity
        build_options = {**build_options, "fully_convolutional": True}
    key = engine_key(key_parts)
    destination = cache_dir("engines") / key[:32]
    if factory is not None:
        engine.attach_factory(factory)

    was_cached = destination.exists()
    if not spec.rebuild and _reuse_cached(engine, destination, progress):
        return engine
    with _one_builder(destination, progress):
        # another process may have built this key while we waited for the lock
        if not spec.rebuild and not was_cached and _reuse_cached(engine, destination, progress):
            return engine
        if spec.precision == "int8":  # made only for a build (a cached engine is found by its key)
            if note := int8_speed_note(engine.device):
                progress.warning(note)
            with clock.stage("calibration_sampling"):
                val_set = with_copies(cal_set, val_set, calibration_info)
            cal_samples = in_memory(cal_set.windows)
            val_samples = in_memory(val_set.windows) if val_set else None
        _build(
            engine,
            key,
            key_parts,
            calibration_info,
            destination,
            progress,
            clock,
            request_fields={
                "model_id": card.id,
                "onnx_path": onnx_path,
                "window_shape": card.window_size,
                "in_channels": card.in_channels,
                "num_classes": card.num_classes,
                "torch_module_factory": factory,
                "calibration": cal_samples,
                "validation": val_samples,
                "options": build_options,
            },
        )
    engine.build_report["stage_seconds"] = clock.rounded()
    engine.build_report["build_seconds"] = round(time.perf_counter() - started, 2)
    return engine


def _network(
    card: ModelCard, spec: EngineSpec, backend: str, progress: Progress
) -> tuple[Callable[[], Any] | None, Path | None]:
    """``(PyTorch module factory for the torch backends, FP32 ONNX export for the others)``."""
    from engine_tools import networks

    progress.update("export", 0.0, f"exporting {card.id} to ONNX")
    factory = None
    if backend.startswith("torch"):
        factory = networks.torch_factory(card, spec.weights_dir, random_weights=spec.random_weights)
    onnx_path = None
    if backend != "torch":
        onnx_path = Path(
            networks.export_onnx(
                card,
                spec.weights_dir,
                random_weights=spec.random_weights,
                progress=progress,
                rebuild=spec.rebuild,
            )
        )
    progress.update("export", 1.0, "network ready")
    return factory, onnx_path


def _key_parts(
    card: ModelCard,
    spec: EngineSpec,
    engine: Engine,
    backend: str,
    onnx_path: Path | None,
    calibration_info: dict[str, Any],
    build_options: dict[str, Any],
) -> dict[str, Any]:
    """Everything the engine depends on; its hash names the cache folder."""
    from engine_tools import networks

    key_parts: dict[str, Any] = {
        "pipeline": PIPELINE_VERSION,
        "model": card.id,
        "card": sha256_json(card.raw),
        "network": sha256_file(onnx_path) if onnx_path else networks.export_key(card, None, False),
        "backend": backend,
        "versions": engine.versions(),
        "precision": spec.precision,
        "device": engine.device,
    }
    if spec.precision == "int8":
        key_parts.update(
            calibration=calibration_info.get("fingerprint"),
            validation=calibration_info.get("validation_fingerprint"),
            calibration_method=spec.calibration_method,
            target_dice=float(spec.target_dice),
            options={
                k: v for k, v in build_options.items() if k not in ("calibration_method", "target_dice")
            },
        )
    return key_parts


@contextmanager
def _one_builder(destination: Path, progress: Progress) -> Iterator[None]:
    """Hold the per-key lock; a second build of the same key waits here (and then reuses the result)."""
    from filelock import Timeout

    lock = key_lock(destination)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.log(f"another process is building engine {destination.name}; waiting for it")
        lock.acquire(poll_interval=0.2)
    try:
        yield
    finally:
        lock.release()


def _reuse_cached(
    engine: Engine, destination: Path, progress: Progress, quiet_if_absent: bool = False
) -> bool:
    """Load the engine cached at ``destination`` if its ``engine.json`` is readable and every artifact
    file still has the SHA-256 recorded at build time; otherwise say why (a log warning) and return
    False so that it is rebuilt. Never reuses an engine silently when it cannot be verified."""
    if not destination.exists():
        return False
    metadata_path = destination / METADATA_FILE
    problem = None
    try:
        metadata = json.loads(metadata_path.read_text())
        if not isinstance(metadata, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        metadata, problem = {}, f"{METADATA_FILE} is missing or unreadable ({exc})"
    problem = problem or hash_problem(destination, metadata.get("artifact_sha256"), (METADATA_FILE,))
    if problem is None:
        try:
            engine.build_report = metadata.get("build_report", {})
            with progress.span(0.95, 1.0):
                progress.update("compile", 0.0, f"loading cached engine {destination.name}")
                engine.load(destination)
        except Exception as exc:  # a corrupt artifact the backend refuses
            problem = f"the backend could not load it ({type(exc).__name__}: {str(exc)[:200]})"
    if problem is not None:
        progress.warning(f"cached engine {destination.name} is not usable: {problem}; rebuilding it")
        return False
    engine.cache_status = "hit"
    progress.log(f"engine cache hit: {destination}")
    return True


def _build(
    engine: Engine,
    key: str,
    key_parts: dict[str, Any],
    calibration_info: dict[str, Any],
    destination: Path,
    progress: Progress,
    clock: StageClock,
    request_fields: dict[str, Any],
) -> None:
    """Build into a temporary folder, record the SHA-256 of every artifact file in ``engine.json``,
    move it into place atomically and load it. Stages go to ``clock``: the guard's and the engine's own
    (``accuracy_guard.stage_seconds``, ``engine_stage_seconds``), the rest of ``engine.build`` as
    ``engine_build``, then ``metadata`` and ``compile``."""
    request = BuildRequest(**request_fields)
    with progress.span(0.3, 0.95), atomic_directory(destination) as tmp:
        start = time.perf_counter()
        report = engine.build(request, tmp, progress)
        inner = {
            **report.pop("engine_stage_seconds", {}),
            **(report.get("accuracy_guard") or {}).get("stage_seconds", {}),
        }
        clock.add({**inner, "engine_build": time.perf_counter() - start - sum(inner.values())})
        if calibration_info:
            report.update(sample_report(calibration_info))
        report["stage_seconds"] = clock.rounded()
        with clock.stage("metadata"):
            _write_metadata(tmp, key, key_parts, calibration_info, report)
    engine.build_report = report
    with progress.span(0.95, 1.0), clock.stage("compile"):
        progress.update("compile", 0.0, "compiling the engine")
        engine.load(destination)
        progress.update("compile", 1.0, "engine ready")
    engine.cache_status = "built"


def _write_metadata(
    folder: Path,
    key: str,
    key_parts: dict[str, Any],
    calibration_info: dict[str, Any],
    report: dict[str, Any],
) -> None:
    """``engine.json``: the key, its parts, the build report and the SHA-256 of every artifact file."""
    metadata = {
        "key": key,
        "key_parts": key_parts,
        "calibration": calibration_info,
        "build_report": report,
        "artifact_sha256": file_hashes(folder, (METADATA_FILE,)),
    }
    with open(folder / METADATA_FILE, "w", encoding="utf-8") as stream:
        json.dump(metadata, stream, indent=2, sort_keys=True, default=str)
        stream.flush()
        os.fsync(stream.fileno())
