"""The accuracy guard's report and its candidates (:mod:`engine_tools.guard`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class GuardReport:
    """What the guard did and reached; the ``accuracy_guard`` entry of every INT8 build report."""

    target: float
    validated_on: str
    initial_mean_dice: float
    final_mean_dice: float
    met_target: bool
    below_target: bool
    allow_below_target: bool
    per_label: dict[str, Any]
    worst: Any
    sqnr_db: float | None
    kept_in_higher_precision: list[str]
    higher_precision: str
    quantizable_layers: int
    int8_layers: int
    int8_compute_fraction: float | None
    compute_measure: str
    labels_too_small_to_score: list[int] = field(default_factory=list)
    #: mean agreement Dice of each validation sample alone, in the order ``validated_on`` names them
    #: (the scan(s) first, then any scanner-variation copies); empty for a single sample
    sample_mean_dice: list[float] = field(default_factory=list)
    min_label_voxels: int = 0
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    sensitivity_method: str = "not run"
    quantize_calls: int = 0
    reference_fp32: str = "not computed"  # "computed", or "cache" (engine_tools.reference_cache)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: per scored label, INT8's voxel count relative to FP32's minus one, pooled over the validation
    #: samples (:func:`engine_tools.accuracy.agreement_dice`), and the largest in size ``[label, change]``
    volume_change: dict[str, float] = field(default_factory=dict)
    largest_volume_change: list[Any] = field(default_factory=lambda: [None, None])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """One quantized model under test and its agreement with strict FP32."""

    model: Any
    agreement: dict[str, Any]
    recipe: dict[str, Any]
    kept: list[str]
    seconds_per_sample: list[float] = field(default_factory=list)
    #: measured on the proxy crops (keep/escalate choices), not on the whole validation samples
    proxy: bool = False

    @property
    def mean(self) -> float:
        return float(self.agreement["mean"])


def _finite(value: float, cap: float = 200.0) -> float:
    return cap if not np.isfinite(value) else float(value)
