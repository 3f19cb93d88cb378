"""Command-line options and argument handling shared by ``build``, ``segment``, ``compare`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine_tools.engines import BACKENDS, PRECISIONS
from engine_tools.progress import Progress
from engine_tools.spec import EngineSpec

CALIBRATION_METHODS = ("minmax", "percentile", "histogram", "mean_minmax")


def add_engine_arguments(parser: argparse.ArgumentParser, precision_default: str | None = "int8") -> None:
    """Backend, precision, calibration folder/size/method, accuracy-guard settings, seed and rebuild.
    Every setting that changes an engine is accepted by each command that builds or finds one, so that
    ``build`` and a later ``segment`` with the same flags share the cached engine."""
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="auto: TensorRT with an NVIDIA GPU and tensorrt installed, else OpenVINO on the CPU",
    )
    if precision_default is not None:
        parser.add_argument("--precision", choices=PRECISIONS, default=precision_default)
    parser.add_argument(
        "--calibration", metavar="FOLDER", help="folder (searched recursively) of unlabeled scans for INT8"
    )
    parser.add_argument(
        "--validation",
        metavar="FOLDER",
        help="folder of unlabeled scans of OTHER subjects the INT8 accuracy guard validates on (default: "
        "a quarter of the --calibration scans, held out whole and not calibrated on)",
    )
    parser.add_argument(
        "--windows",
        type=int,
        default=None,
        metavar="N",
        help="calibration windows to sample (default: the model card's, 32 unless the card says otherwise); "
        "fully convolutional networks take one whole cropped volume per scan, from at most N scans",
    )
    parser.add_argument(
        "--calibration-method",
        "--method",
        dest="calibration_method",
        choices=CALIBRATION_METHODS,
        default="minmax",
        help="activation range estimator (default minmax)",
    )
    parser.add_argument(
        "--target-dice",
        type=float,
        default=0.97,
        help="INT8 accuracy guard: minimum mean agreement Dice with FP32 on held-out subjects (default 0.97)",
    )
    parser.add_argument(
        "--allow-below-target",
        action="store_true",
        help="let an INT8 build end below --target-dice instead of keeping more layers in higher precision "
        "(the result then says below_target)",
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="INT8: quantize once and only measure agreement, keeping no layer in higher precision "
        "(not recommended)",
    )
    parser.add_argument(
        "--no-scanner-variations",
        action="store_true",
        help="INT8 from a single calibration scan: the guard validates on that scan only, not also on its "
        "contrast and sharpness copies (a faster build and a more optimistic estimate)",
    )
    parser.add_argument("--device", help="device (cpu, cuda:0, ...); default: the backend's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampling")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a cached engine matches")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the architecture WITHOUT its published weights (random, seeded): for size/speed checks "
        "when the weights cannot be downloaded; the labels are not a segmentation",
    )


def check_engine_arguments(args: argparse.Namespace) -> None:
    if not 0.0 < args.target_dice <= 1.0:
        raise ValueError(f"--target-dice must be in (0, 1], got {args.target_dice}")
    if args.windows is not None and args.windows < 2:
        raise ValueError(f"--windows must be at least 2 (calibration + held-out windows), got {args.windows}")


def calibration_windows(args: argparse.Namespace, card: Any) -> int:
    """``--windows``, else the card's default number of calibration windows."""
    return args.windows if args.windows is not None else card.calibration_windows


def load_calibration(args: argparse.Namespace, card: Any, progress: Progress) -> Any:
    """The :class:`CalibrationSet` from ``--calibration`` (``None`` when not given)."""
    check_engine_arguments(args)
    warn_random_weights(args, progress)
    return _collect_calibration(args, card, progress)


def _collect_calibration(
    args: argparse.Namespace, card: Any, progress: Progress, option: str = "calibration"
) -> Any:
    """The :class:`CalibrationSet` of ``--calibration`` (or ``--validation``); ``None`` when not given."""
    value = getattr(args, option, None)
    if not value:
        return None
    from engine_tools.calibration import collect_windows

    folder = Path(value)
    if not folder.is_dir():
        raise FileNotFoundError(f"--{option} {folder}: not a folder of scans")
    with progress.span(0.0, 0.2):
        samples = collect_windows(
            folder, card, num_windows=calibration_windows(args, card), seed=args.seed, progress=progress
        )
    for warning in getattr(samples, "warnings", []):
        progress.warning(str(warning))
    return samples


def require_input(path: str, option: str = "--input") -> Path:
    resolved = Path(path)
    if not resolved.exists():
        raise FileNotFoundError(f"{option} {resolved}: no such file or folder")
    return resolved


def warn_random_weights(args: argparse.Namespace, progress: Progress) -> None:
    if getattr(args, "random_weights", False):
        progress.warning(
            "--random-weights: the network has random weights; sizes and latencies are real, the labels are not"
        )


def engine_spec(
    args: argparse.Namespace, card: Any, progress: Progress, precision: str | None = None, **fields: Any
) -> EngineSpec:
    """The :class:`EngineSpec` of the engine options on the command line (calibration and validation
    samples loaded once from ``--calibration`` and ``--validation``; only when the precision, or one of
    ``args.precisions``, is INT8)."""
    precision = precision or getattr(args, "precision", None) or "int8"
    wanted = [precision, *getattr(args, "precisions", [])]
    check_engine_arguments(args)
    warn_random_weights(args, progress)
    if getattr(args, "validation", None) and not args.calibration:
        raise ValueError("--validation needs --calibration (the folder INT8 is calibrated on)")
    calibration = _collect_calibration(args, card, progress) if "int8" in wanted else None
    validation = _collect_calibration(args, card, progress, "validation") if "int8" in wanted else None
    options = dict(fields.pop("options", None) or {})
    if getattr(args, "no_scanner_variations", False):
        options["scanner_variations"] = False
    return EngineSpec(
        backend=args.backend,
        precision=precision,
        device=args.device,
        calibration=calibration,
        validation=validation,
        calibration_method=args.calibration_method,
        target_dice=args.target_dice,
        seed=args.seed,
        rebuild=args.rebuild,
        weights_dir=args.weights_dir,
        random_weights=args.random_weights,
        allow_below_target=args.allow_below_target,
        guard=not getattr(args, "no_guard", False),
        options=options,
        **fields,
    )


def below_target(described: dict[str, Any]) -> bool:
    """Whether an engine's accuracy guard ended below its target (only with ``--allow-below-target``);
    results carry it as ``below_target`` so that the Slicer panel can show it in red."""
    return bool((described.get("accuracy_guard") or {}).get("below_target"))
