"""Command-line options and argument handling shared by ``build``, ``segment``, ``compare`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine_tools.engines import BACKENDS, PRECISIONS
from engine_tools.progress import Progress

CALIBRATION_METHODS = ("minmax", "percentile", "histogram", "mean_minmax")


def add_engine_arguments(parser: argparse.ArgumentParser, precision_default: str | None = "int8") -> None:
    """Backend, precision, calibration folder/size/method, accuracy-guard target, seed and rebuild."""
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
        "--windows",
        type=int,
        default=None,
        metavar="N",
        help="calibration windows to sample (default: the model card's, 32 unless the card says otherwise)",
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
        help="INT8 accuracy guard: minimum mean agreement Dice with FP32 on held-out windows (default 0.97)",
    )
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
    if not args.calibration:
        return None
    from engine_tools.calibration import collect_windows

    folder = Path(args.calibration)
    if not folder.is_dir():
        raise FileNotFoundError(f"--calibration {folder}: not a folder of scans")
    with progress.span(0.0, 0.2):
        calibration = collect_windows(
            folder, card, num_windows=calibration_windows(args, card), seed=args.seed, progress=progress
        )
    for warning in getattr(calibration, "warnings", []):
        progress.warning(str(warning))
    return calibration


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
