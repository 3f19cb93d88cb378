"""What a backend implements to take part in the accuracy guard (:mod:`engine_tools.guard`), and the
error the guard raises when its target cannot be met."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class BelowTargetError(RuntimeError):
    """The guard could not reach its target and the user did not allow a build below it."""


class QuantizationAdapter(Protocol):
    """What the guard needs from a backend. Candidates are the backend's own model objects."""

    #: precision of layers kept out of INT8 ("f32", or "bf16" where the CPU computes it natively)
    fallback: str

    def layers(self) -> list[str]:
        """Names of the quantizable layers (convolutions, matrix products) in execution order."""

    def layer_costs(self) -> dict[str, float]:
        """Multiply-accumulates (or, without static shapes, weights) of each quantizable layer."""

    def recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        """The calibration recipe the user asked for (method, preset, ...), JSON-ready."""

    def better_recipes(self, recipe: dict[str, Any]) -> list[dict[str, Any]]:
        """Other recipes worth trying when ``recipe`` misses the target (may be empty)."""

    def quantize(self, excluded: Sequence[str], recipe: dict[str, Any]) -> Any:
        """Calibrate and quantize, leaving the ``excluded`` layers in higher precision."""

    def keep_layers(self, candidate: Any, layers: Sequence[str]) -> Any:
        """``candidate`` with ``layers`` back in higher precision, without re-calibrating."""

    def quantized_layers(self, candidate: Any) -> list[str]:
        """Layers of ``candidate`` that really take INT8 inputs."""

    def run(
        self, candidate: Any | None, windows: Sequence[np.ndarray], timings: list[float] | None = None
    ) -> np.ndarray | list[np.ndarray]:
        """Logits of ``candidate`` (``None``: strict FP32) on samples (windows or whole cropped volumes);
        seconds per sample into ``timings``."""

    # optional ``run_digests(candidate, samples, timings) -> [LogitsDigest]``: what ``run`` gives, as
    # the guard's digests (:class:`engine_tools.accuracy.LogitsDigest`) computed by the backend itself
    # optional ``layer_taps(candidate, sample, layers) -> {layer: (float input, output)}`` on one
    # ``C, D, H, W`` sample (``candidate`` None: strict FP32): the one-pass sensitivity uses it
