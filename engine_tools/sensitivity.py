"""One-pass layer sensitivity for the INT8 accuracy guard: which quantized layer adds the most noise.

Method. One strict-FP32 pass and one INT8 pass over the same sample, with every quantizable layer's
float input (for an INT8 layer: the activation *before* its quantizer) and its output tapped
(:meth:`QuantizationAdapter.layer_taps`). For each layer the SQNR of its input and of its output
(INT8 model against FP32 model, in dB) are measured. The noise-to-signal ratio ``NSR = 10^(-SQNR/10)``
that reaches a layer's input was made upstream; what its output carries beyond that,
``NSR_out - NSR_in``, is the noise the layer itself adds (its input and weight quantization).
Layers are ranked by that added noise, largest first; the report lists per layer the input and output
SQNR, their difference ``delta_db = SQNR_in - SQNR_out`` and ``added_noise_db`` (the added NSR in dB).
Ranking by the added NSR rather than by ``delta_db`` keeps the first layer comparable: its input is
exact (SQNR infinite), so its ``delta_db`` is infinite whatever it adds.

Limits. Noise powers are assumed to add and relative noise to pass through a layer unchanged; a
nonlinearity, clipping or a strongly amplifying layer breaks that, so the ranking is an estimate. SQNR
is not Dice: the layer that raises logits SQNR most is not always the one that raises agreement most
(measured on the brainchop MeshNets), so the guard measures Dice for every set of layers it keeps.
The taps are taken on one sample: for fully convolutional networks a centred sub-crop of the first
validation sample (``sensitivity_crop`` voxels per axis, default 64: taps of a whole 256^3 head with
21 channels are 1.4 GB each), otherwise the validation window itself, with layers tapped in groups
small enough to bound memory; each group's taps are reduced to signal and noise sums and freed before
the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine_tools.accuracy import decibels, signal_and_noise
from engine_tools.guard_report import _finite
from engine_tools.progress import Progress

#: Tapped voxels (per model, over all tapped layers of one pass) before the layers are split in groups.
TAP_VOXEL_BUDGET = 12 * 64**3


#: side of the centred cube the guard measures whole volumes' keep choices and layer ranking on
PROXY_CROP = 128


def centred_crop(sample: np.ndarray, size: int) -> np.ndarray:
    """The centred ``size``-voxel cube of a ``C, D, H, W`` sample (smaller axes are kept whole)."""
    slices = [slice(None)]
    for extent in sample.shape[1:]:
        start = max(0, (extent - size) // 2)
        slices.append(slice(start, start + min(size, extent)))
    return np.ascontiguousarray(sample[tuple(slices)], dtype=np.float32)


def _rounded(value: float) -> float | None:
    return round(value, 3) if np.isfinite(value) else None


def layer_entry(layer: str, reference: tuple[Any, Any], test: tuple[Any, Any]) -> dict[str, Any]:
    """One layer's input/output SQNR, their difference and the noise the layer adds (see module doc)."""
    in_signal, in_noise = signal_and_noise(reference[0], test[0])
    out_signal, out_noise = signal_and_noise(reference[1], test[1])
    nsr_in = in_noise / in_signal if in_signal > 0 else 0.0
    nsr_out = out_noise / out_signal if out_signal > 0 else 0.0
    added = max(nsr_out - nsr_in, 0.0)
    input_db, output_db = decibels(in_signal, in_noise), decibels(out_signal, out_noise)
    return {
        "layer": layer,
        "input_sqnr_db": _rounded(input_db),
        "output_sqnr_db": _rounded(output_db),
        "delta_db": _rounded(input_db - output_db) if np.isfinite(output_db) else None,
        "added_noise_db": _rounded(10.0 * np.log10(added)) if added > 0 else None,
        "added_nsr": added,
    }


def one_pass(
    adapter: Any,
    candidate: Any,
    sample: np.ndarray,
    layers: Sequence[str],
    progress: Progress,
) -> list[dict[str, Any]]:
    """Per-layer entries (in ``layers`` order) from tapped FP32 and INT8 passes over ``sample``."""
    voxels = int(np.prod(sample.shape[1:]))
    per_pass = max(1, TAP_VOXEL_BUDGET // max(voxels, 1))
    entries: list[dict[str, Any]] = []
    for start in range(0, len(layers), per_pass):
        group = list(layers[start : start + per_pass])
        progress.update("guard", 0.4 + 0.3 * start / len(layers), f"tapping {len(group)} layer(s)")
        reference = adapter.layer_taps(None, sample, group)
        test = adapter.layer_taps(candidate, sample, group)
        entries.extend(layer_entry(layer, reference[layer], test[layer]) for layer in group)
        del reference, test
    return entries


def ranked(entries: list[dict[str, Any]]) -> list[str]:
    """Layers by the noise they add, largest first (ties: the lower output SQNR first)."""
    order = sorted(
        entries,
        key=lambda e: (-e["added_nsr"], e["output_sqnr_db"] if e["output_sqnr_db"] is not None else 1e9),
    )
    return [entry["layer"] for entry in order]


def by_keeping(guard: Any, base: Any, windows: int) -> list[str]:
    """The fallback ranking for adapters without taps: one evaluation of ``base`` per layer with that
    layer alone back in higher precision (on the first ``windows`` validation samples), ranked by the
    logits SQNR then the Dice it gives back; entries go to ``guard.sensitivity``."""
    reference = guard.evaluate(base.model, windows=windows)
    for index, name in enumerate(guard.layers):
        guard.progress.update("guard", 0.4 + 0.3 * index / len(guard.layers), f"sensitivity of {name}")
        agreement = guard.evaluate(guard.adapter.keep_layers(base.model, [name]), windows=windows)
        guard.sensitivity.append(
            {
                "layer": name,
                "dice_gain": round(agreement["mean"] - reference["mean"], 5),
                "sqnr_gain_db": round(_finite(agreement["sqnr_db"]) - _finite(reference["sqnr_db"]), 3),
            }
        )
    order = sorted(guard.sensitivity, key=lambda s: (-s["sqnr_gain_db"], -s["dice_gain"]))
    return [entry["layer"] for entry in order]


def by_quantizing_alone(guard: Any, base: Any) -> list[str]:
    """The ranking where the guard measures on proxy crops (whole volumes of fully convolutional
    networks): one evaluation of each layer alone left in INT8 (weights and input quantizer; every
    other layer back in higher precision), ranked by the agreement it costs, then by its logits SQNR.

    On the brainchop MeshNets the one-pass ranking missed the layers that cost agreement: the 1x1
    output layer averages the noise it is given (its output SQNR beats its input's) yet its input
    quantizer cost model18cls 0.019-0.022 Dice on its own, as much as any layer
    (``bench/results/int8_weight_rounding.md``); this ranking measures that directly, one proxy pass
    per layer. Scanner-variation copies among the validation samples are left out of the ranking
    (each would add one proxy pass per layer; the keep steps measure them)."""
    out = [*guard.forced, *guard.by_pattern]
    for index, name in enumerate(guard.layers):
        guard.progress.update("guard", 0.4 + 0.3 * index / len(guard.layers), f"sensitivity of {name}")
        alone = guard.adapter.keep_layers(base.model, [n for n in guard.layers if n != name] + out)
        agreement = guard.evaluate(alone, proxy=True, originals=True)
        guard.sensitivity.append(
            {
                "layer": name,
                "dice_alone": round(float(agreement["mean"]), 5),
                "sqnr_alone_db": round(_finite(agreement["sqnr_db"]), 3),
            }
        )
    order = sorted(guard.sensitivity, key=lambda s: (s["dice_alone"], s["sqnr_alone_db"]))
    return [entry["layer"] for entry in order]
