"""How the accuracy guard (:mod:`engine_tools.guard`) measures a candidate: its validation samples,
their centred proxy crops, their strict-FP32 references (computed once, or from the cache of an
earlier build) and the agreement of a candidate with them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine_tools import accuracy, reference_cache, sensitivity
from engine_tools.engines.base import as_samples
from engine_tools.stage_clock import StageClock


class GuardMeasurements:
    """The measuring half of :class:`~engine_tools.guard.AccuracyGuard` (which sets ``adapter``,
    ``options`` and ``clock`` before :meth:`measure_on`)."""

    adapter: Any
    options: dict[str, Any]
    clock: StageClock

    def measure_on(
        self,
        validation: np.ndarray | Sequence[np.ndarray] | None,
        calibration: np.ndarray | Sequence[np.ndarray],
    ) -> None:
        """Validate on ``validation`` (``None`` or empty: the calibration samples, reported as such);
        whole volumes of fully convolutional networks also get centred proxy crops
        (``keep_proxy_crop``, default :data:`engine_tools.sensitivity.PROXY_CROP`)."""
        options = self.options
        self.min_voxels = int(options.get("min_label_voxels", 1000))
        # what the samples are and where they come from (the build pipeline says which subjects)
        self.validation_source = str(options.get("validation_note", "held-out windows"))
        if validation is None or len(validation) == 0:
            validation = calibration
            self.validation_source = str(
                options.get("validation_note", "calibration windows (no held-out windows given)")
            )
        self.validation = as_samples(validation)
        #: the last samples may be scanner-variation copies of the others: measured, but not ranked on
        self.originals = max(1, len(self.validation) - int(options.get("validation_copies", 0)))
        self.fp32_times: list[float] = []
        self._reference: list[accuracy.LogitsDigest] | None = None
        self.reference_source = "not computed"
        crop = int(options.get("keep_proxy_crop", sensitivity.PROXY_CROP))
        self.proxy: list[np.ndarray] | None = None  # centred crops keep/escalate choices are measured on
        whole = options.get("fully_convolutional") and getattr(self.adapter, "any_spatial_shape", False)
        if crop > 0 and whole and any(max(s.shape[1:]) > crop for s in self.validation):
            self.proxy = [sensitivity.centred_crop(s, crop) for s in self.validation]
        self._proxy_reference: list[accuracy.LogitsDigest] | None = None

    def reference(self) -> list[accuracy.LogitsDigest]:
        """Strict-FP32 logits of the validation samples as digests (labels and SQNR sub-grid, see
        :class:`engine_tools.accuracy.LogitsDigest`), computed once (timed per sample)."""
        if self._reference is None:
            with self.clock.stage("reference_fp32"):
                self._reference = self._cached_reference()
        return self._reference

    def _cached_reference(self) -> list[accuracy.LogitsDigest]:
        """The FP32 pass, or its result cached by a build of the same network (``reference_network``
        option) on the same samples (:mod:`engine_tools.reference_cache`)."""
        cached = reference_cache.computed_or_cached(
            self.options.get("reference_network"),
            self.validation,
            lambda times: self._digested(None, self.validation, timings=times),
        )
        self.reference_source = "cache" if cached.from_cache else "computed"
        self.fp32_times = cached.seconds_per_sample
        return cached.digests

    def _digested(
        self, model: Any, samples: Sequence[np.ndarray], timings: list[float] | None = None
    ) -> list[accuracy.LogitsDigest]:
        """:func:`adapter_digests` of this guard's adapter."""
        return adapter_digests(self.adapter, model, samples, timings)

    def evaluate(
        self,
        model: Any,
        windows: int | None = None,
        timings: list[float] | None = None,
        proxy: bool = False,
        originals: bool = False,
    ) -> dict[str, Any]:
        """Agreement of ``model`` with strict FP32 on the (first ``windows``) validation samples, or on
        their centred proxy crops (``originals``: not those of scanner-variation copies)."""
        if proxy and self.proxy is not None:
            if self._proxy_reference is None:
                self._proxy_reference = self._proxy_fp32()
            count = self.originals if originals else len(self.proxy)
            found = self._digested(model, self.proxy[:count])
            reference = self._proxy_reference[:count]
            return accuracy.digest_agreement(reference, found, min_voxels=self.min_voxels)
        count = len(self.validation) if windows is None else max(1, min(windows, len(self.validation)))
        found = self._digested(model, self.validation[:count], timings=timings)
        reference = self.reference()[:count]
        agreement = accuracy.digest_agreement(reference, found, min_voxels=self.min_voxels)
        if count > 1:  # each sample alone too: a scanner-variation copy may sit well below the pool
            agreement["per_sample"] = accuracy.sample_means(reference, found, min_voxels=self.min_voxels)
        return agreement

    def _proxy_fp32(self) -> list[accuracy.LogitsDigest]:
        """Strict-FP32 digests of the proxy crops; a sample no larger than the crop (a scanner-variation
        copy is cut to it) is its own proxy, and its whole-sample reference serves."""
        whole = self.reference()
        todo = [
            i for i, (p, s) in enumerate(zip(self.proxy, self.validation, strict=True)) if p.shape != s.shape
        ]
        with self.clock.stage("reference_fp32"):
            computed = dict(zip(todo, self._digested(None, [self.proxy[i] for i in todo]), strict=True))
        return [computed.get(i, whole[i]) for i in range(len(self.proxy))]


def adapter_digests(
    adapter: Any, model: Any, samples: Sequence[np.ndarray], timings: list[float] | None = None
) -> list[accuracy.LogitsDigest]:
    """Digests of ``model``'s logits (strict FP32 for None) through a quantization adapter: the
    adapter's own where it computes them (``run_digests``: OpenVINO, in the graph), else
    :func:`accuracy.run_digested` of its logits."""
    own = getattr(adapter, "run_digests", None)
    if own is not None:
        return own(model, samples, timings=timings)
    return accuracy.run_digested(lambda group: adapter.run(model, group, timings=timings), samples)
