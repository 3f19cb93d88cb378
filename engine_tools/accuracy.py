"""Agreement between two segmentations or two sets of logits (INT8 versus FP32, engine versus reference).

Used by the accuracy guard of the INT8 builds and by ``medquant compare``. Label maps are integer arrays
of any shape; logits are ``N, K, ...`` float arrays (classes on axis 1), or sequences of them whose
spatial shapes differ (whole cropped volumes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np


def dice_per_label(labels_a: np.ndarray, labels_b: np.ndarray, num_classes: int) -> dict[int, float | None]:
    """Dice of every label value ``0..num_classes-1``; ``None`` where the label is absent from both."""
    a = np.asarray(labels_a).ravel().astype(np.int64)
    b = np.asarray(labels_b).ravel().astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in size: {np.shape(labels_a)} vs {np.shape(labels_b)}")
    count_a = np.bincount(a, minlength=num_classes)[:num_classes]
    count_b = np.bincount(b, minlength=num_classes)[:num_classes]
    both = np.bincount(a[a == b], minlength=num_classes)[:num_classes]
    result: dict[int, float | None] = {}
    for value in range(num_classes):
        total = int(count_a[value] + count_b[value])
        result[value] = None if total == 0 else float(2.0 * both[value] / total)
    return result


def agreement_dice(
    labels_a: np.ndarray,
    labels_b: np.ndarray,
    num_classes: int,
    include_background: bool = True,
    min_voxels: int = 0,
) -> dict[str, Any]:
    """Per-label Dice between two label maps, their mean over labels present in either, and the worst.

    Returns ``{"per_label": {value: dice | None}, "mean": float, "worst": (value, dice),
    "voxels": int, "excluded_small": [values], "volume_change": {value: change},
    "largest_volume_change": (value, change)}``. Labels absent from both maps are ``None`` and do not
    enter the mean; nor do labels with fewer than ``min_voxels`` voxels in either map (listed in
    ``excluded_small``: on a few windows their Dice is noise, on a whole volume they are larger).
    ``volume_change`` is, for the scored labels, ``b``'s voxel count relative to ``a``'s minus one
    (+0.012: ``b`` labels 1.2% more): a systematic shift that a high Dice can hide, and what a volumetric
    reading of the segmentation would report.
    """
    per_label = dice_per_label(labels_a, labels_b, num_classes)
    counts_a = np.bincount(np.asarray(labels_a).ravel().astype(np.int64), minlength=num_classes)
    counts_b = np.bincount(np.asarray(labels_b).ravel().astype(np.int64), minlength=num_classes)
    small: list[int] = []
    if min_voxels > 0:
        largest = np.maximum(counts_a, counts_b)
        small = [v for v, d in per_label.items() if d is not None and largest[v] < min_voxels]
    scored = {
        value: dice
        for value, dice in per_label.items()
        if dice is not None and (include_background or value != 0) and value not in small
    }
    found: dict[str, Any] = {
        "per_label": per_label,
        "mean": 1.0,
        "worst": (None, None),
        "voxels": int(np.size(labels_a)),
        "excluded_small": small,
        "volume_change": {
            value: float(counts_b[value]) / float(counts_a[value]) - 1.0 for value in scored if counts_a[value]
        },
        "largest_volume_change": (None, None),
    }
    if not scored:
        return found
    worst = min(scored.items(), key=lambda item: item[1])
    found.update(mean=float(np.mean(list(scored.values()))), worst=(int(worst[0]), float(worst[1])))
    if found["volume_change"]:
        value, change = max(found["volume_change"].items(), key=lambda item: abs(item[1]))
        found["largest_volume_change"] = (int(value), float(change))
    return found


def logits_agreement(
    reference_logits: np.ndarray | Sequence[np.ndarray],
    test_logits: np.ndarray | Sequence[np.ndarray],
    include_background: bool = True,
    min_voxels: int = 0,
) -> dict[str, Any]:
    """:func:`agreement_dice` of the arg-max of two sets of logits (:func:`class_argmax`, as the guard's
    digests) plus their SQNR.

    Each is one ``N, K, ...`` array or a sequence of such arrays of differing spatial shapes (whole
    cropped volumes). Voxels are pooled over all samples: one Dice per label over every voxel of every
    sample (a large volume weighs more than a small one, as it does in a segmentation), and one SQNR
    of all logits together.
    """
    references, tests = _samples(reference_logits), _samples(test_logits)
    if len(references) != len(tests):
        raise ValueError(f"{len(references)} reference samples but {len(tests)} test samples")
    num_classes = int(references[0].shape[1])
    result = agreement_dice(
        np.concatenate([class_argmax(r).ravel() for r in references]),
        np.concatenate([class_argmax(t).ravel() for t in tests]),
        num_classes,
        include_background=include_background,
        min_voxels=min_voxels,
    )
    result["sqnr_db"] = sqnr_db(references, tests)
    return result


#: Logits kept whole for SQNR up to this size; larger ones on a regular sub-grid of voxels.
SQNR_SAMPLE_BYTES = 64 * 2**20


@dataclass
class LogitsDigest:
    """What agreement needs of one sample's ``1, K, ...`` logits, small enough to keep: the arg-max
    ``labels`` (``1, ...``; ties to the first class, as :func:`numpy.argmax`) and the logits on every
    ``stride``-th voxel along each spatial axis (``sampled``; ``stride`` 1: all of them) for SQNR.

    A whole volume of a 104-class network has 4-7 GB of logits; its digest has a byte per voxel and
    64 MiB of logits, so the accuracy guard holds its reference as digests and drops every
    candidate's logits as soon as they are digested."""

    labels: np.ndarray
    sampled: np.ndarray
    stride: int
    num_classes: int


def digest(logits: np.ndarray, max_sampled_bytes: int = SQNR_SAMPLE_BYTES) -> LogitsDigest:
    """The :class:`LogitsDigest` of one sample's ``1, K, ...`` logits (the smallest stride whose
    sub-grid fits ``max_sampled_bytes``)."""
    logits = np.asarray(logits)
    num_classes, dims = int(logits.shape[1]), logits.ndim - 2
    stride = sqnr_stride(logits.shape, max_sampled_bytes)
    grid = (slice(None), slice(None), *[slice(None, None, stride)] * dims)
    return LogitsDigest(class_argmax(logits), np.array(logits[grid], dtype=np.float32), stride, num_classes)


def sqnr_stride(shape: Sequence[int], max_sampled_bytes: int = SQNR_SAMPLE_BYTES) -> int:
    """The smallest stride whose sub-grid of float32 logits of ``shape`` (``N, K, ...``) fits
    ``max_sampled_bytes``: the :class:`LogitsDigest` stride of such logits."""
    nbytes, dims = 4 * int(np.prod(shape)), len(shape) - 2
    stride = 1
    while nbytes / stride**dims > max_sampled_bytes and stride < max(shape[2:]):
        stride += 1
    return stride


def class_argmax(logits: np.ndarray) -> np.ndarray:
    """``np.argmax(logits, axis=1)`` of ``N, K, ...`` logits as uint8 (uint16 above 256 classes), one
    class at a time: :func:`numpy.argmax` over the class axis first copies the logits class-last
    (6 GB for 104 classes over a head), this holds one float per voxel. Ties go to the first class."""
    logits = np.asarray(logits)
    labels = np.zeros((logits.shape[0], *logits.shape[2:]), np.uint8 if logits.shape[1] <= 256 else np.uint16)
    best = np.array(logits[:, 0], dtype=np.float32)
    better = np.empty(best.shape, dtype=bool)
    for value in range(1, logits.shape[1]):
        np.greater(logits[:, value], best, out=better)
        labels[better] = value
        np.maximum(best, logits[:, value], out=best)
    return labels


def digests(logits: np.ndarray | Sequence[np.ndarray], **kwargs: Any) -> list[LogitsDigest]:
    """One :class:`LogitsDigest` per sample: each window of an ``N, K, ...`` array, or each array of
    a sequence of whole volumes."""
    items = _samples(logits)
    if isinstance(logits, np.ndarray):
        return [digest(items[0][index : index + 1], **kwargs) for index in range(len(items[0]))]
    return [digest(item, **kwargs) for item in items]


def run_digested(
    run: Callable[[list[np.ndarray]], np.ndarray | Sequence[np.ndarray]], samples: Sequence[np.ndarray]
) -> list[LogitsDigest]:
    """Digests of ``run(group)``'s logits over ``samples``, run in groups of one shape (windows: one
    call, one compilation); a whole volume's logits are dropped once digested, so at most one
    volume's are held."""
    found: list[LogitsDigest] = []
    for _, group in groupby(samples, key=lambda sample: sample.shape):
        found += digests(run(list(group)))
    return found


def digest_agreement(
    reference: Sequence[LogitsDigest],
    test: Sequence[LogitsDigest],
    include_background: bool = True,
    min_voxels: int = 0,
) -> dict[str, Any]:
    """:func:`logits_agreement` from digests: Dice from the labels of every voxel, SQNR from the sampled
    logits (exact where the stride is 1, a regular sub-grid estimate where larger)."""
    if len(reference) != len(test):
        raise ValueError(f"{len(reference)} reference samples but {len(test)} test samples")
    if not reference:
        raise ValueError("no logits to compare")
    for ref, other in zip(reference, test, strict=True):
        if ref.stride != other.stride or ref.sampled.shape != other.sampled.shape:
            raise ValueError(f"digests differ: stride {ref.stride} vs {other.stride}")
    result = agreement_dice(
        np.concatenate([r.labels.ravel() for r in reference]),
        np.concatenate([t.labels.ravel() for t in test]),
        reference[0].num_classes,
        include_background=include_background,
        min_voxels=min_voxels,
    )
    result["sqnr_db"] = sqnr_db([r.sampled for r in reference], [t.sampled for t in test])
    result["sqnr_stride"] = max(r.stride for r in reference)
    return result


def sample_means(
    reference: Sequence[LogitsDigest], test: Sequence[LogitsDigest], min_voxels: int = 0
) -> list[float]:
    """Mean agreement Dice of each sample alone (:func:`digest_agreement` of one pair), rounded."""
    return [
        round(float(digest_agreement([r], [t], min_voxels=min_voxels)["mean"]), 5)
        for r, t in zip(reference, test, strict=True)
    ]


def _samples(logits: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """``N, K, ...`` arrays (an array, or a list of arrays with the class axis at 1)."""
    if isinstance(logits, np.ndarray):
        return [logits]
    items = [np.asarray(item) for item in logits]
    if not items:
        raise ValueError("no logits to compare")
    return items


#: Values per float64 chunk in :func:`sqnr_db` (8 MiB per temporary array).
SQNR_CHUNK = 1 << 20


def signal_and_noise(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """``(sum(ref^2), sum((ref - test)^2))`` of two equally shaped arrays, summed in float64 over
    chunks: whole-volume logits (18 x 256^3 values) never get float64 copies."""
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    flat_reference, flat_test = reference.reshape(-1), test.reshape(-1)
    signal = noise = 0.0
    for start in range(0, flat_reference.size, SQNR_CHUNK):
        chunk = flat_reference[start : start + SQNR_CHUNK].astype(np.float64)
        difference = chunk - flat_test[start : start + SQNR_CHUNK]
        noise += float(difference @ difference)
        signal += float(chunk @ chunk)
    return signal, noise


def decibels(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``; ``inf`` without noise, ``-inf`` without signal."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def sqnr_db(reference: np.ndarray | Sequence[np.ndarray], test: np.ndarray | Sequence[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - test)^2))``, summed
    over every array of two equally long sequences (or two arrays).

    ``inf`` when the two are identical.
    """
    signal = noise = 0.0
    for ref, other in zip(_samples(reference), _samples(test), strict=True):
        pair_signal, pair_noise = signal_and_noise(ref, other)
        signal, noise = signal + pair_signal, noise + pair_noise
    return decibels(signal, noise)


def json_ready(agreement: dict[str, Any]) -> dict[str, Any]:
    """An agreement result with string keys and rounded numbers, for JSON reports."""
    out = dict(agreement)
    out["per_label"] = {
        str(k): (None if v is None else round(float(v), 5)) for k, v in agreement["per_label"].items()
    }
    out["mean"] = round(float(agreement["mean"]), 5)
    if "sqnr_db" in out and np.isfinite(out["sqnr_db"]):
        out["sqnr_db"] = round(float(out["sqnr_db"]), 3)
    worst = agreement.get("worst", (None, None))
    out["worst"] = [worst[0], None if worst[1] is None else round(float(worst[1]), 5)]
    if "volume_change" in agreement:
        out["volume_change"] = {str(k): round(float(v), 5) for k, v in agreement["volume_change"].items()}
        value, change = agreement.get("largest_volume_change") or (None, None)
        out["largest_volume_change"] = [value, None if change is None else round(float(change), 5)]
    return out
