"""Agreement metrics used by the INT8 accuracy guard and `medquant compare`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine_tools import accuracy
from engine_tools.accuracy import agreement_dice, json_ready, logits_agreement, sqnr_db


def test_agreement_dice_per_label_mean_and_worst() -> None:
    a = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    b = np.array([0, 0, 1, 2, 2, 2, 2, 2])
    result = agreement_dice(a, b, num_classes=4)
    assert result["per_label"][0] == pytest.approx(1.0)
    assert result["per_label"][1] == pytest.approx(2 * 1 / (2 + 1))
    assert result["per_label"][2] == pytest.approx(2 * 4 / (4 + 5))
    assert result["per_label"][3] is None  # absent from both: not counted
    expected_mean = np.mean([1.0, 2 / 3, 8 / 9])
    assert result["mean"] == pytest.approx(expected_mean)
    assert result["worst"] == (1, pytest.approx(2 / 3))
    ready = json_ready(result)
    assert ready["per_label"]["3"] is None and ready["worst"][0] == 1
    # b labels 1 voxel of label 1 as 2: label 1 loses half its volume, label 2 gains a quarter
    assert result["volume_change"] == {0: 0.0, 1: pytest.approx(-0.5), 2: pytest.approx(0.25)}
    assert result["largest_volume_change"] == (1, pytest.approx(-0.5))
    assert ready["volume_change"] == {"0": 0.0, "1": -0.5, "2": 0.25}
    assert ready["largest_volume_change"] == [1, -0.5]


def test_volume_change_covers_the_scored_labels_only() -> None:
    a = np.array([0] * 50 + [1] * 20 + [2] * 3)
    b = np.array([0] * 48 + [1] * 22 + [3] * 3)  # label 2 gone, label 3 new: small, unscored
    result = agreement_dice(a, b, num_classes=4, include_background=False, min_voxels=5)
    assert result["excluded_small"] == [2, 3]
    assert result["volume_change"] == {1: pytest.approx(0.1)}  # not background, not the small labels
    assert result["largest_volume_change"] == (1, pytest.approx(0.1))
    nothing = agreement_dice(np.zeros(4, int), np.zeros(4, int), 2, include_background=False)
    assert nothing["volume_change"] == {} and nothing["largest_volume_change"] == (None, None)


def test_agreement_dice_identical_and_disjoint() -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=(4, 8, 8))
    assert agreement_dice(labels, labels, 5)["mean"] == pytest.approx(1.0)
    disjoint = agreement_dice(np.zeros(10, int), np.ones(10, int), 2)
    assert disjoint["mean"] == 0.0 and disjoint["per_label"] == {0: 0.0, 1: 0.0}
    with pytest.raises(ValueError, match="differ in size"):
        agreement_dice(np.zeros(3, int), np.zeros(4, int), 2)


def test_sqnr_db_and_logits_agreement() -> None:
    reference = np.ones((1, 2, 4, 4, 4), np.float32)
    assert math.isinf(sqnr_db(reference, reference))
    noisy = reference + 0.1  # noise power 0.01 per element, signal 1 → 20 dB
    assert sqnr_db(reference, noisy) == pytest.approx(20.0, abs=1e-4)
    logits = np.zeros((1, 3, 2, 2, 2), np.float32)
    logits[:, 1] = 1.0
    other = logits.copy()
    other[0, 2, 0, 0, 0] = 5.0  # one voxel flips from class 1 to class 2
    result = logits_agreement(logits, other)
    assert result["per_label"][1] == pytest.approx(2 * 7 / 15)
    assert result["per_label"][2] == 0.0 and result["per_label"][0] is None
    assert np.isfinite(result["sqnr_db"])


def test_small_labels_can_be_left_out_of_the_mean() -> None:
    a = np.zeros(1000, int)
    b = np.zeros(1000, int)
    a[:3] = 1  # a 3-voxel structure the two maps disagree on
    b[3:6] = 1
    full = agreement_dice(a, b, 2)
    assert full["mean"] < 0.6
    guarded = agreement_dice(a, b, 2, min_voxels=10)
    assert guarded["excluded_small"] == [1] and guarded["per_label"][1] == 0.0
    assert guarded["mean"] == pytest.approx(full["per_label"][0])


def test_logits_of_samples_of_differing_shapes_pool_their_voxels() -> None:
    """Whole cropped volumes differ in shape: one Dice per label over the voxels of all samples (a large
    volume weighs more than a small one) and one SQNR over all logits, as if they were one volume."""
    rng = np.random.default_rng(3)
    reference = [rng.normal(size=(1, 3, 6, 5, 4)), rng.normal(size=(1, 3, 9, 7, 8))]
    test = [r + rng.normal(scale=0.4, size=r.shape) for r in reference]
    pooled = logits_agreement(reference, test)
    flat_ref = np.concatenate([np.argmax(r, axis=1).ravel() for r in reference])
    flat_test = np.concatenate([np.argmax(t, axis=1).ravel() for t in test])
    assert pooled["mean"] == pytest.approx(agreement_dice(flat_ref, flat_test, 3)["mean"])
    assert pooled["voxels"] == 6 * 5 * 4 + 9 * 7 * 8
    signal = sum(float(np.sum(r**2)) for r in reference)
    noise = sum(float(np.sum((r - t) ** 2)) for r, t in zip(reference, test, strict=True))
    assert pooled["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise))
    # the small sample alone agrees differently: the pooled mean is not an average of per-sample means
    assert pooled["mean"] != pytest.approx(logits_agreement(reference[:1], test[:1])["mean"])
    with pytest.raises(ValueError, match="2 reference samples but 1 test"):
        logits_agreement(reference, test[:1])


def test_class_argmax_equals_numpy_with_ties_to_the_first_class() -> None:
    from engine_tools.accuracy import class_argmax

    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(2, 7, 5, 6, 4)), 1).astype(np.float32)  # many ties
    assert np.array_equal(class_argmax(logits), np.argmax(logits, axis=1))
    many = rng.normal(size=(1, 300, 3, 3, 3)).astype(np.float32)
    found = class_argmax(many)
    assert found.dtype == np.uint16 and np.array_equal(found, np.argmax(many, axis=1))


def test_logits_and_digest_agreement_take_the_same_arg_max_nan_included() -> None:
    """``compare``'s logits agreement and the guard's digest agreement label voxels alike, also where a
    logit is NaN (a NaN never wins the arg-max in either)."""
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(2, 4, 6, 7, 5)).astype(np.float32)
    test = reference + rng.normal(scale=0.3, size=reference.shape).astype(np.float32)
    test[0, 2, :3] = np.nan
    test[1, 0, 1, 2] = np.nan
    by_logits = accuracy.logits_agreement(reference, test)
    by_digests = accuracy.digest_agreement(accuracy.digests(reference), accuracy.digests(test))
    assert by_logits["per_label"] == by_digests["per_label"] and by_logits["mean"] < 1.0
    assert 2 not in set(accuracy.class_argmax(test)[0, :3].ravel())
