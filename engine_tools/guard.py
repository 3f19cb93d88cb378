"""The INT8 accuracy guard: one procedure, the same for every backend.

An INT8 build promises agreement with strict FP32 (mean agreement Dice over labels, ``--target-dice``)
on held-out samples. :class:`AccuracyGuard` keeps that promise in steps, each a method and each
recorded in the report's ``attempts``:

1. **calibrate** — quantize with the requested recipe; within ``recipe_margin`` (default 0.005) of the
   target, try the backend's better recipes (on the brainchop MeshNets none raised agreement on an
   unseen subject, ``bench/results/int8_recipes_recipes.md``, so a larger miss goes straight on).
2. **rank** (:mod:`engine_tools.sensitivity`) — on whole volumes (proxy crops) each layer alone left
   in INT8, ranked by the agreement it costs; else one-pass sensitivity where the adapter taps
   intermediate outputs (OpenVINO, ONNX Runtime); otherwise (TensorRT/ModelOpt) each quantized layer
   alone goes back to higher precision and the layers are ranked by what this gives back.
3. **keep** — the top-ranked layers in higher precision, fewest first, up to ``max_kept_layers``; the
   chosen set is re-calibrated without them only when one quantization took at most
   ``confirm_budget_s`` (default 20 s).
4. **escalate** — still below target: keep more (doubling) up to every layer, and finally strict FP32
   for the kept ones. With ``allow_below_target`` this is skipped and the report says ``below_target``.
   Then :meth:`~AccuracyGuard.faster_without_int8`: a set keeping most of the compute out of INT8
   gives way to the whole network in the higher precision where that meets the target and runs faster.
5. **report** — one :class:`GuardReport` (agreement, kept layers, the share of compute that stays
   INT8, latency against strict FP32, seconds per stage, every attempt).

A backend takes part through a :class:`~engine_tools.guard_adapter.QuantizationAdapter`: OpenVINO
(NNCF, :mod:`engine_tools.engines.openvino.quantize`), ONNX Runtime (``quantize_static``,
:mod:`engine_tools.engines.onnxruntime.quantize`) and TensorRT (ModelOpt Q/DQ ONNX,
:mod:`engine_tools.engines.tensorrt.quantize`). Not ``nncf.quantize_with_accuracy_control``: it serves
NNCF's backends only, reverts layers until a maximum *drop*, and reports little; the product needs one
guard for every backend, an agreement target, escalation to a fully higher-precision engine and a
report a user can read. Statistics are recomputed per quantize call (NNCF's ``nncf.quantize`` takes no
collected statistics), which a guarded build does once in the common case. The INT8 latency is timed
on the final candidate's own evaluation pass, so measuring it costs no extra pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine_tools import accuracy, sensitivity
from engine_tools.guard_adapter import BelowTargetError, QuantizationAdapter
from engine_tools.guard_measure import GuardMeasurements
from engine_tools.guard_report import Candidate, GuardReport, _finite
from engine_tools.progress import Progress
from engine_tools.stage_clock import StageClock


class AccuracyGuard(GuardMeasurements):
    """Quantize through ``adapter`` and keep INT8 within ``target_dice`` of strict FP32.

    ``validation`` are held-out samples (``None``: the ``calibration`` samples, reported as such): an
    ``N, C, D, H, W`` array or a list of ``C, D, H, W`` whole cropped volumes; ``validation_note``
    (an option) says in the report what they are and which subjects they come from.
    Options: ``target_dice``, ``guard`` (False: quantize once and only measure), ``ignored_layers``,
    ``keep_higher_precision_patterns``, ``max_kept_layers``, ``sensitivity_windows``,
    ``calibration_budget_s``, ``allow_below_target``, ``min_label_voxels``, ``recipe_margin``,
    ``confirm_budget_s``, ``sensitivity_crop``, ``fully_convolutional``, ``keep_proxy_crop``,
    ``validation_copies`` (measuring: :class:`~engine_tools.guard_measure.GuardMeasurements`).
    """

    def __init__(
        self,
        adapter: QuantizationAdapter,
        validation: np.ndarray | Sequence[np.ndarray] | None,
        calibration: np.ndarray | Sequence[np.ndarray],
        options: dict[str, Any],
        progress: Progress,
    ) -> None:
        self.adapter = adapter
        self.options = options
        self.progress = progress
        self.target = float(options.get("target_dice", 0.97))
        self.enabled = bool(options.get("guard", True))
        self.allow_below_target = bool(options.get("allow_below_target", False))
        self.calibration_windows = len(calibration)
        self.clock = StageClock()
        self.measure_on(validation, calibration)
        self.forced = list(options.get("ignored_layers", []))
        patterns = list(options.get("keep_higher_precision_patterns", []))
        self.by_pattern = [n for n in adapter.layers() if any(re.search(p, n) for p in patterns)]
        self.layers = [n for n in adapter.layers() if n not in self.forced and n not in self.by_pattern]
        self.attempts: list[dict[str, Any]] = []
        self.sensitivity: list[dict[str, Any]] = []
        self.quantize_calls = 0
        self.sensitivity_method = "not run"
        self._on_whole: dict[tuple[Any, ...], Candidate] = {}

    def _record(self, step: str, candidate: Candidate, start: float) -> None:
        self.attempts.append(
            {
                "step": step,
                "calibration": dict(candidate.recipe),
                "kept_in_higher_precision": list(candidate.kept),
                "mean_dice": round(candidate.mean, 5),
                "worst": accuracy.json_ready(candidate.agreement)["worst"],
                "sqnr_db": round(_finite(candidate.agreement["sqnr_db"]), 3),
                "seconds": round(time.perf_counter() - start, 2),
                **({"measured_on": "proxy crops"} if candidate.proxy else {}),
                **({"median_s": _median_s(candidate)} if candidate.seconds_per_sample else {}),
            }
        )
        kept = f" keeping {len(candidate.kept)} layer(s) in higher precision" if candidate.kept else ""
        self.progress.log(f"INT8 guard [{step}]: mean agreement Dice {candidate.mean:.4f}{kept}")

    def _measured(
        self,
        step: str,
        model: Any,
        recipe: dict[str, Any],
        kept: list[str],
        start: float,
        proxy: bool = False,
    ) -> Candidate:
        timings: list[float] = []
        proxy = proxy and self.proxy is not None
        agreement = self.evaluate(model, timings=timings, proxy=proxy)
        candidate = Candidate(model, agreement, recipe, kept, [] if proxy else timings, proxy)
        self._record(step, candidate, start)
        return candidate

    def _quantized(self, step: str, recipe: dict[str, Any], kept: list[str]) -> Candidate:
        start = time.perf_counter()
        self.reference()  # timed as its own stage, not as this step's quantization
        with self.clock.stage("quantize"):
            self.quantize_calls += 1
            model = self.adapter.quantize(kept + self.by_pattern, recipe)
        return self._measured(step, model, recipe, kept, start)

    def _kept(self, step: str, base: Candidate, layers: list[str]) -> Candidate:
        start = time.perf_counter()
        # the forced and pattern layers are already out of INT8; naming them lets "all layers" be seen
        model = self.adapter.keep_layers(base.model, [*layers, *self.forced, *self.by_pattern])
        return self._measured(step, model, base.recipe, self.forced + layers, start, proxy=True)

    def _on_proxy(self, candidate: Candidate) -> Candidate:
        """``candidate`` measured on the proxy crops (itself without proxy crops)."""
        if self.proxy is None or candidate.proxy:
            return candidate
        return Candidate(
            candidate.model,
            self.evaluate(candidate.model, proxy=True),
            candidate.recipe,
            candidate.kept,
            [],
            True,
        )

    def _on_full(self, candidate: Candidate, step: str) -> Candidate:
        """A proxy-measured choice measured again on the whole validation samples (what is reported)."""
        if not candidate.proxy:
            return candidate
        key = (tuple(candidate.kept), repr(sorted(candidate.recipe.items())), self.adapter.fallback)
        if key not in self._on_whole:  # a set already checked on the whole samples is not run again
            start = time.perf_counter()
            self._on_whole[key] = self._measured(
                step, candidate.model, candidate.recipe, candidate.kept, start
            )
        return self._on_whole[key]

    def met(self, candidate: Candidate) -> bool:
        return candidate.mean >= self.target

    # ------------------------------------------------------------------ the steps
    def calibrate(self) -> Candidate:
        """Step 1: the requested recipe; the backend's better recipes only while below target by at
        most ``recipe_margin`` and within ``calibration_budget_s`` (see the module doc)."""
        recipe = self.adapter.recipe(self.options)
        self.progress.update("calibrate", 0.1, f"quantizing on {self.calibration_windows} samples")
        best = self._quantized("initial", recipe, list(self.forced))
        budget = float(self.options.get("calibration_budget_s", 120.0))
        margin = float(self.options.get("recipe_margin", 0.005))
        if (
            not self.enabled
            or self.met(best)
            or self.target - best.mean > margin
            or self.stage_seconds().get("quantize", 0.0) > budget
        ):
            return best
        self.progress.update("guard", 0.3, "trying better calibration")
        for number, other in enumerate(self.adapter.better_recipes(recipe)):
            candidate = self._quantized(f"calibration-{number + 1}", other, list(self.forced))
            if candidate.mean > best.mean:
                best = candidate
            if self.met(best):
                break
        return best

    def rank(self, base: Candidate) -> list[str]:
        """Step 2: the layers most worth keeping first (:mod:`engine_tools.sensitivity`): on proxy crops
        each layer alone in INT8, else one-pass sensitivity where the adapter taps activations, else
        each layer alone back in higher precision."""
        start = time.perf_counter()
        if self.proxy is not None:
            order = sensitivity.by_quantizing_alone(self, base)
            self.sensitivity_method = "each layer alone in INT8, the others in higher precision (proxy crops)"
            details = {"sample": "centred proxy crops of the validation samples", "passes": len(self.layers)}
            if self.originals < len(self.validation):
                details["sample"] += " (not of their scanner-variation copies)"
        elif getattr(self.adapter, "layer_taps", None) is not None:
            sample = self.validation[0]
            crop = int(self.options.get("sensitivity_crop", 64))
            cropped = bool(self.options.get("fully_convolutional")) and getattr(
                self.adapter, "any_spatial_shape", False
            )
            if cropped:
                sample = sensitivity.centred_crop(sample, crop)
            entries = sensitivity.one_pass(self.adapter, base.model, sample, self.layers, self.progress)
            self.sensitivity = [{k: v for k, v in e.items() if k != "added_nsr"} for e in entries]
            self.sensitivity_method = "one pass: per-layer input/output SQNR, INT8 against FP32"
            order = sensitivity.ranked(entries)
            where = f"centred {list(sample.shape[1:])} crop of" if cropped else "one"
            details = {"sample": f"{where} validation sample", "passes": "one FP32 + one INT8 (tapped)"}
        else:
            windows = int(self.options.get("sensitivity_windows", 2))
            order = sensitivity.by_keeping(self, base, windows)
            self.sensitivity_method = "each layer alone back to higher precision on the quantized model"
            details = {"windows": min(windows, len(self.validation))}
        self.attempts.append(
            {
                "step": "sensitivity",
                "method": self.sensitivity_method,
                **details,
                "layers": len(self.layers),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        return order

    def keep(self, base: Candidate, ranked: list[str]) -> Candidate:
        """Step 3: keep the top-ranked layers, fewest first, up to ``max_kept_layers``. With whole
        volumes the choices are measured on centred proxy crops (``keep_proxy_crop``, default :data:`sensitivity.PROXY_CROP`) and
        only the chosen set on the whole samples. It is confirmed by quantizing again without those
        layers (re-calibrated) when one quantization took at most ``confirm_budget_s``; the better wins."""
        limit = min(len(ranked), int(self.options.get("max_kept_layers", max(1, len(self.layers) // 2))))
        chosen = start = self._on_proxy(base)
        for count in range(1, limit + 1):
            self.progress.update("guard", 0.7 + 0.1 * count / limit, f"keeping {count} layer(s)")
            candidate = self._kept(f"keep-{count}", base, ranked[:count])
            if candidate.mean > chosen.mean:
                chosen = candidate
            if self.met(candidate):
                break
        if chosen is start:
            return base
        chosen = self._on_full(chosen, f"keep-{len(chosen.kept)}-whole")
        confirm_budget = float(self.options.get("confirm_budget_s", 20.0))
        if self.stage_seconds().get("quantize", 0.0) / self.quantize_calls > confirm_budget:
            return chosen
        confirmed = self._quantized(f"ignored-scope-{len(chosen.kept)}", base.recipe, chosen.kept)
        return confirmed if confirmed.mean >= chosen.mean else chosen

    def escalate(self, base: Candidate, best: Candidate, ranked: list[str]) -> Candidate:
        """Step 4: keep more layers (doubling) up to all of them, then strict FP32 for the kept ones;
        where the proxy crops were too optimistic, again on the whole samples."""
        best = self._escalated(base, best, ranked)
        if best.proxy:
            best = self._on_full(best, f"{self.attempts[-1]['step']}-whole")
            if not self.met(best):
                self.proxy = None
                best = self._escalated(base, best, ranked)
        return best

    def _escalated(self, base: Candidate, best: Candidate, ranked: list[str]) -> Candidate:
        count = max(1, len(best.kept) - len(self.forced))
        best = self._on_proxy(best)
        while not self.met(best) and count < len(ranked):
            count = min(len(ranked), count * 2)
            self.progress.update("guard", 0.85, f"escalating: keeping {count} of {len(ranked)} layers")
            candidate = self._kept(f"escalate-{count}", base, ranked[:count])
            if candidate.mean >= best.mean or self.met(candidate):
                best = candidate
        if not self.met(best) and self.adapter.fallback != "f32":
            self.adapter.fallback = "f32"
            best = self._kept("escalate-strict-fp32", base, ranked)
        return best

    def faster_without_int8(self, base: Candidate, best: Candidate, ranked: list[str]) -> Candidate:
        """Step 4b: a set that meets the target by keeping most of the compute out of INT8 (less than
        ``faster_check_below``, default 0.5, stays INT8) may run slower than the whole network in the
        higher precision, which pays no quantize and dequantize between layers. That network is
        measured on the whole samples; when it meets the target and runs faster, it is the result,
        with a warning (on the brainchop 18-class MeshNet, 2 of 10 layers in INT8 ran slower than all
        in BF16)."""
        if not self.met(best) or best.proxy or not best.kept or set(ranked) <= set(best.kept):
            return best
        fraction = self.int8_fraction(best.model)
        if fraction is None or fraction >= float(self.options.get("faster_check_below", 0.5)):
            return best
        start = time.perf_counter()
        model = self.adapter.keep_layers(base.model, [*ranked, *self.forced, *self.by_pattern])
        whole = self._measured("all-higher-precision", model, base.recipe, self.forced + ranked, start)
        if not (self.met(whole) and _median_s(whole) < _median_s(best)):
            return best
        self.progress.warning(
            f"INT8 meeting the target kept {len(best.kept)} of {len(ranked)} layers in "
            f"{self.adapter.fallback} and ran slower ({_median_s(best):.2f} s/sample) than the whole "
            f"network in {self.adapter.fallback} ({_median_s(whole):.2f} s/sample), which meets it too: "
            f"the engine runs in {self.adapter.fallback} throughout; a lower --target-dice keeps more INT8"
        )
        return whole

    def int8_fraction(self, model: Any) -> float | None:
        """Share of the compute (multiply-accumulates) of ``model``'s layers that runs in INT8."""
        costs = self.adapter.layer_costs()
        total = sum(costs.values())
        int8 = sum(costs.get(name, 0.0) for name in self.adapter.quantized_layers(model))
        return int8 / total if total > 0 else None

    # ------------------------------------------------------------------ the guard
    def run(self) -> tuple[Any, GuardReport]:
        """The guarded INT8 model and its report; raises :class:`BelowTargetError` when the target is
        missed and ``allow_below_target`` is not set."""
        with self.clock.stage("guard_calibrate"):
            best = self.calibrate()
        initial = self.attempts[0]["mean_dice"]
        if self.enabled and not self.met(best) and self.layers:
            base = best
            with self.clock.stage("sensitivity"):
                ranked = self.rank(base)
            with self.clock.stage("guard_keep"):
                best = self.keep(base, ranked)
            if not self.met(best) and not self.allow_below_target:
                with self.clock.stage("guard_escalate"):
                    best = self.escalate(base, best, ranked)
            with self.clock.stage("guard_faster_check"):
                best = self.faster_without_int8(base, best, ranked)
        with self.clock.stage("guard_report"):
            report = self.report(best, initial)
        report.stage_seconds = self.stage_seconds()
        if report.below_target:
            message = (
                f"INT8 agreement {best.mean:.4f} stays below the target {self.target} after the accuracy "
                f"guard (kept {len(best.kept)} layer(s) in higher precision)"
            )
            if self.enabled and not self.allow_below_target:
                raise BelowTargetError(
                    f"{message}; choose a lower --target-dice, another precision, or --allow-below-target"
                )
            self.progress.warning(message)
        return best.model, report

    def stage_seconds(self) -> dict[str, float]:
        """Exclusive seconds per guard stage so far (``quantize`` and ``reference_fp32`` apart from the
        steps they ran in)."""
        return self.clock.rounded()

    def latency(self, best: Candidate) -> dict[str, Any]:
        """Median seconds per sample of the guarded model against strict FP32, on the same samples: the
        timings of the final candidate's own evaluation and of the FP32 reference pass (no extra pass;
        both include the first inference after compiling)."""
        int8_times = best.seconds_per_sample or [float("nan")]
        fp32, int8 = float(np.median(self.fp32_times)), float(np.median(int8_times))
        if int8 >= fp32:
            self.progress.warning(
                f"INT8 ({int8:.3f} s/sample) is not faster than strict FP32 ({fp32:.3f} s/sample) "
                f"with {len(best.kept)} layer(s) kept in higher precision"
            )
        return {
            "fp32_strict_median_s": round(fp32, 4),
            "int8_median_s": round(int8, 4),
            "speedup_vs_fp32": round(fp32 / int8, 3) if int8 > 0 else None,
            "windows": len(self.validation),
            "timed_on": "the guard's FP32 reference pass and the final candidate's evaluation pass"
            + (" (FP32 timed when its reference was cached)" if self.reference_source == "cache" else ""),
        }

    def report(self, best: Candidate, initial: float) -> GuardReport:
        """Step 5: the report, including the share of compute (MACs) that stays INT8."""
        costs = self.adapter.layer_costs()
        int8_layers = self.adapter.quantized_layers(best.model)
        fraction = self.int8_fraction(best.model)
        ready = accuracy.json_ready(best.agreement)
        return GuardReport(
            target=self.target,
            validated_on=f"{len(self.validation)} {self.validation_source}",
            initial_mean_dice=round(float(initial), 5),
            final_mean_dice=ready["mean"],
            met_target=self.met(best),
            below_target=not self.met(best),
            allow_below_target=self.allow_below_target,
            per_label=ready["per_label"],
            worst=ready["worst"],
            volume_change=ready.get("volume_change", {}),
            largest_volume_change=ready.get("largest_volume_change", [None, None]),
            sqnr_db=ready.get("sqnr_db"),
            kept_in_higher_precision=list(best.kept),
            higher_precision=self.adapter.fallback,
            quantizable_layers=len(costs),
            int8_layers=len(int8_layers),
            int8_compute_fraction=None if fraction is None else round(fraction, 4),
            compute_measure=str(getattr(self.adapter, "compute_measure", "multiply-accumulates")),
            labels_too_small_to_score=ready.get("excluded_small", []),
            sample_mean_dice=list(best.agreement.get("per_sample", [])),
            min_label_voxels=self.min_voxels,
            sensitivity=self.sensitivity,
            latency=self.latency(best),
            attempts=self.attempts,
            recipe=dict(best.recipe),
            sensitivity_method=self.sensitivity_method,
            quantize_calls=self.quantize_calls,
            reference_fp32=self.reference_source,
        )


def _median_s(candidate: Candidate) -> float:
    """Median seconds per whole sample of a candidate's evaluation (infinite when not timed)."""
    return (
        round(float(np.median(candidate.seconds_per_sample)), 4)
        if candidate.seconds_per_sample
        else float("inf")
    )
