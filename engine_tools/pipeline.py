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
from typing import TYPE_CHECKING, Any

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
from engine_tools.engines import METADATA_FILE, BuildRequest, Engine, engine_class, select_backend
from engine_tools.progress import Progress, SilentProgress
from engine_tools.registry import ModelCard, get_card
from engine_tools.scanner_variations import VARIATION_CROP, scanner_variations
from engine_tools.scanner_variations import describe as describe_variations
from engine_tools.spec import EngineSpec
from engine_tools.stage_clock import StageClock

if TYPE_CHECKING:
    from engine_tools.calibration import CalibrationSet

#: Bump when the artifact layout or build logic changes incompatibly (part of every cache key).
PIPELINE_VERSION = 6


#: At most this many windows of the held-out scans are validated on (each costs guard time).
MAX_HELD_OUT_WINDOWS = 8


def holdout_count(num_windows: int) -> int:
    """Windows held out of a single scan's: a quarter, at least 1 and at most 8 (0 below 2 windows)."""
    if num_windows < 2:
        return 0
    return max(1, min(MAX_HELD_OUT_WINDOWS, num_windows // 4))


#: What the build and the guard's report say when no scan was left unseen by calibration.
UNSEEN = (
    "the estimate is optimistic because no unseen subject was available "
    "(add scans to the calibration folder or pass --validation FOLDER)"
)
OPTIMISTIC = "INT8 accuracy guard: validating on {what}: " + UNSEEN


def _checked(calibration: Any, option: str) -> CalibrationSet:
    from engine_tools.calibration import CalibrationSet

    if not isinstance(calibration, CalibrationSet):
        raise TypeError(
            f"{option} must be a CalibrationSet: engine_tools.calibration.collect_windows(folder, card) "
            f"or CalibrationSet.from_windows(array), not {type(calibration).__name__}"
        )
    return calibration


def _calibration_samples(
    spec: EngineSpec, engine: Engine, card: ModelCard, progress: Progress
) -> tuple[CalibrationSet, CalibrationSet | None, dict[str, Any]]:
    """``(calibration set, validation set or None, description)`` for an INT8 build.

    Validation comes from ``spec.validation`` (other scans, checked by SHA-256), else from whole
    calibration scans held out (:meth:`CalibrationSet.split_subjects`), else, with a single scan, from
    held-out windows of it (or its own volume) and copies of them with scanner variations
    (:mod:`engine_tools.scanner_variations`; option ``scanner_variations``, default on), with a warning
    that the estimate is optimistic. Whole cropped volumes become windows for engines that only run
    the window's shape.
    """
    from engine_tools.calibration import check_disjoint

    calibration = _checked(spec.calibration, "calibration")
    for warning in calibration.warnings:
        progress.warning(warning)
    window = tuple(card.window_size)
    to_windows = not engine.any_spatial_shape and any(
        tuple(s.shape[1:]) != window for s in calibration.samples
    )
    kind = "whole cropped volume(s)" if calibration.whole_volumes and not to_windows else "window(s)"
    per_volume = max(1, -(-int(calibration.settings.get("num_windows", 8)) // max(len(calibration), 1)))
    if spec.validation is not None:
        validation: CalibrationSet | None = _checked(spec.validation, "validation")
        check_disjoint(calibration, validation)
        holdout = "validation folder"
        note = f"{kind} from the validation folder, subjects never used for calibration: "
        note += ", ".join(validation.subjects)
    elif split := calibration.split_subjects(spec.seed):
        calibration, validation = split
        if len(validation) > MAX_HELD_OUT_WINDOWS and not validation.whole_volumes:  # round-robin order
            validation = validation.subset(list(range(MAX_HELD_OUT_WINDOWS)), "first-held-out-windows")
        holdout = "subjects"
        note = f"{kind} of held-out subject(s) never used for calibration: {', '.join(validation.subjects)}"
    else:
        count = holdout_count(len(calibration))
        calibration, validation = calibration.split(count) if count else (calibration, None)
        only = ", ".join(calibration.subjects)
        holdout = "windows of the only scan" if validation is not None else "none"
        what = (
            f"{kind} {'held out of' if validation is not None else 'of'} the only calibration scan ({only})"
        )
        if validation is None:
            what += ", which calibration also used"
        progress.warning(OPTIMISTIC.format(what=what))
        note = f"{what}; {UNSEEN}"
    if to_windows:
        progress.log(f"{engine.backend} runs {list(window)} windows: cutting windows from the volumes")
        calibration = calibration.to_windows(window, per_volume, spec.seed)
        if validation is not None and any(tuple(s.shape[1:]) != window for s in validation.samples):
            validation = validation.to_windows(window, per_volume, spec.seed)
    if holdout in ("windows of the only scan", "none") and spec.options.get("scanner_variations", True):
        crop = VARIATION_CROP if calibration.whole_volumes and not to_windows else None
        base = validation if validation is not None else calibration
        validation = _with_variations(base, crop)
        holdout += " and its scanner variations"
        copies = len(validation) - len(base)
        note = f"samples: {len(base)} {what}, and {copies} {describe_variations(crop)}; {UNSEEN}"
    else:
        copies = 0
    info = {
        "calibration": calibration.describe(),
        "validation": None if validation is None else validation.describe(),
        "holdout": holdout,
        "validation_note": note,
        "validation_copies": copies,
        "fingerprint": calibration.fingerprint,
        "validation_fingerprint": None if validation is None else validation.fingerprint,
    }
    return calibration, validation, info


def _with_variations(validation: CalibrationSet, crop: int | None) -> CalibrationSet:
    """``validation`` and copies of its first samples with scanner variations (contrast, blur; see
    :mod:`engine_tools.scanner_variations`), whole volumes cut to their centred ``crop`` cube."""
    copies = scanner_variations(validation.samples, crop)
    indices = list(range(len(validation))) + [index for index, _, _ in copies]
    samples = validation.samples + [copy for _, _, copy in copies]
    return validation.subset(indices, f"scanner-variations-{crop}", samples)


def _sample_report(info: dict[str, Any]) -> dict[str, Any]:
    """The build report's ``calibration`` and ``validation`` entries: subjects and what the samples were."""
    keys = ("subjects", "samples", "sample_shapes", "num_samples", "fingerprint")
    report = {"calibration": {k: info["calibration"][k] for k in keys}}
    validation = info.get("validation")
    report["validation"] = {
        **({k: validation[k] for k in keys} if validation else {"subjects": [], "samples": "none"}),
        "holdout": info["holdout"],
        "note": info["validation_note"],
    }
    return report


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
    :func:`_calibration_samples`). ``engine.describe()["cache"]`` is ``"hit"`` or ``"built"``. A build's
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
            cal_set, val_set, calibration_info = _calibration_samples(spec, engine, card, progress)
            cal_samples, val_samples = cal_set.windows, val_set.windows if val_set else None
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
            report.update(_sample_report(calibration_info))
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
