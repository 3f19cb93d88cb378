"""Which samples an INT8 build calibrates on and its accuracy guard validates on: other subjects where
there are any (a validation folder, or calibration scans held out whole), else the only scan, with
copies of it under scanner variations; and what the build report says about them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine_tools.progress import Progress
from engine_tools.registry import ModelCard
from engine_tools.scanner_variations import MAX_VARIED_SAMPLES, VARIATION_CROP, VARIATIONS, scanner_variations
from engine_tools.scanner_variations import describe as describe_variations
from engine_tools.spec import EngineSpec

if TYPE_CHECKING:
    from engine_tools.calibration import CalibrationSet
    from engine_tools.engines import Engine

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
    "(on brain MRI, unseen subjects agreed up to 0.01 less than such estimates; "
    "add scans to the calibration folder or pass --validation FOLDER)"
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


def calibration_samples(
    spec: EngineSpec, engine: Engine, card: ModelCard, progress: Progress, make_copies: bool = True
) -> tuple[CalibrationSet, CalibrationSet | None, dict[str, Any]]:
    """``(calibration set, validation set or None, description)`` for an INT8 build.

    Validation comes from ``spec.validation`` (other scans, checked by SHA-256), else from whole
    calibration scans held out (:meth:`CalibrationSet.split_subjects`), else, with a single scan, from
    held-out windows of it (or its own volume) and copies of them with scanner variations
    (:mod:`engine_tools.scanner_variations`; option ``scanner_variations``, default on), with a warning
    that the estimate is optimistic. Whole cropped volumes become windows for engines that only run
    the window's shape. Without ``make_copies`` the copies are described (count, fingerprint, note)
    but not made: a cached engine is found by its key alone; :func:`with_copies` makes them.
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
    copies, crop, varied = 0, None, None
    if holdout in ("windows of the only scan", "none") and spec.options.get("scanner_variations", True):
        crop = VARIATION_CROP if calibration.whole_volumes and not to_windows else None
        base = validation if validation is not None else calibration
        holdout += " and its scanner variations"
        copies = min(len(base), MAX_VARIED_SAMPLES) * len(VARIATIONS)
        note = f"samples: {len(base)} {what}, and {copies} {describe_variations(crop)}; {UNSEEN}"
        varied = base.derived_fingerprint(_variations_tag(crop))
    info = {
        "calibration": calibration.describe(),
        "validation": None if validation is None else validation.describe(),
        "holdout": holdout,
        "validation_note": note,
        "validation_copies": copies,
        "fingerprint": calibration.fingerprint,
        "validation_fingerprint": varied or (None if validation is None else validation.fingerprint),
    }
    if copies:
        info["variation_crop"] = crop
        if make_copies:
            validation = with_copies(calibration, validation, info)
    return calibration, validation, info


def with_copies(
    calibration: CalibrationSet, validation: CalibrationSet | None, info: dict[str, Any]
) -> CalibrationSet | None:
    """The validation set with the scanner-variation copies ``info`` describes (made now), or the
    validation set as it is where it describes none; ``info["validation"]`` describes the result."""
    if not info.get("validation_copies"):
        return validation
    varied = _with_variations(validation if validation is not None else calibration, info["variation_crop"])
    if varied.fingerprint != info["validation_fingerprint"]:
        raise RuntimeError("scanner-variation copies differ from the set the engine key describes")
    info["validation"] = varied.describe()
    return varied


def _variations_tag(crop: int | None) -> str:
    return f"scanner-variations-{crop}"


def _with_variations(validation: CalibrationSet, crop: int | None) -> CalibrationSet:
    """``validation`` and copies of its first samples with scanner variations (contrast, blur; see
    :mod:`engine_tools.scanner_variations`), whole volumes cut to their centred ``crop`` cube."""
    copies = scanner_variations(validation.samples, crop)
    indices = list(range(len(validation))) + [index for index, _, _ in copies]
    samples = validation.samples + [copy for _, _, copy in copies]
    return validation.subset(indices, _variations_tag(crop), samples)


def sample_report(info: dict[str, Any]) -> dict[str, Any]:
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
