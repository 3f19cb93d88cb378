"""What engine to prepare: one typed spec, built once from the command line or the Slicer panel.

:func:`engine_tools.pipeline.prepare_engine` takes a card and an :class:`EngineSpec`;
``medquant build``/``segment``/``compare`` build theirs with
:func:`engine_tools.commands._options.engine_spec`, and :func:`engine_tools.compare.compare_precisions`
derives one per precision with :meth:`EngineSpec.for_precision`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine_tools.calibration import CalibrationSet


@dataclass
class EngineSpec:
    """Backend, precision and device of an engine, and how an INT8 one is calibrated and guarded.

    ``calibration``: the samples of a folder of unlabeled scans (INT8 only). ``validation``: samples of
    other scans (another folder) the accuracy guard validates on; without it a quarter of the
    calibration scans is held out whole for the guard (with a single scan, some of its windows). ``target_dice``: the guard's minimum mean agreement Dice with
    FP32; ``allow_below_target`` lets a build end below it (its report then says ``below_target``).
    ``seed`` is the seed the calibration windows were sampled with. ``options`` are further backend
    settings (``preset``, ``max_kept_layers``, ...).
    """

    backend: str = "auto"
    precision: str = "int8"
    device: str | None = None
    calibration: CalibrationSet | None = None
    validation: CalibrationSet | None = None
    calibration_method: str = "minmax"
    target_dice: float = 0.97
    seed: int = 0
    rebuild: bool = False
    weights_dir: str | Path | None = None
    random_weights: bool = False
    allow_below_target: bool = False
    guard: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def for_precision(self, precision: str) -> EngineSpec:
        """The same spec at another precision (calibration and validation kept for INT8 only)."""
        int8 = precision == "int8"
        return replace(
            self,
            precision=precision,
            calibration=self.calibration if int8 else None,
            validation=self.validation if int8 else None,
        )

    def build_options(self) -> dict[str, Any]:
        """The options the backend's build sees (part of the engine's cache key)."""
        options = {
            **self.options,
            "calibration_method": self.calibration_method,
            "target_dice": float(self.target_dice),
        }
        if self.allow_below_target:
            options["allow_below_target"] = True
        if not self.guard:
            options["guard"] = False
        return options
