"""Calibration: on a synthetic validation split the thresholds reach their targets, measured by running the
calibrated cascade itself; each threshold is the tightest one that does (so a wrong rule would miss)."""

from __future__ import annotations

import numpy as np
import pytest
from cascade_stubs import CountingBinary, CountingSpectral, CountingVerifier, scored_image

from unigendet.cascade import Cascade, Decision
from unigendet.cascade.calibration import (
    CalibrationTargets,
    calibrate,
    threshold_for_fnr,
    threshold_for_fpr,
)
from unigendet.config.loader import ConfigError


def _validation(n=400, seed=0):
    """Labels alternate; every stage scores fakes higher, with overlap."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    images = []
    for i, y in enumerate(labels):
        b, s, m = (float(np.clip(rng.normal(0.35 + 0.3 * y, 0.18), 0, 1)) for _ in range(3))
        images.append(scored_image(b, s, m, seed=i))
    return images, labels


def _rates(results, labels):
    fakes = [r for r, y in zip(results, labels) if y == 1]
    reals = [r for r, y in zip(results, labels) if y == 0]
    fake2 = [r for r in fakes if r.stage_exited != "binary"]
    fake3 = [r for r in fakes if r.stage_exited == "mllm"]
    real3 = [r for r in reals if r.stage_exited == "mllm"]
    return {"binary_fnr": (sum(r.stage_exited == "binary" for r in fakes), len(fakes)),
            "spectral_fnr": (sum(r.stage_exited == "spectral" for r in fake2), len(fake2)),
            "block_fpr": (sum(r.decision is Decision.BLOCK for r in real3), len(real3)),
            "cleared_fnr": (sum(r.decision is Decision.PASS for r in fake3), len(fake3))}


@pytest.mark.parametrize("targets", [CalibrationTargets(0.05, 0.10, 0.05, 0.20),
                                     CalibrationTargets(0.2, 0.0, 0.1, 0.0)])
def test_calibrated_cascade_meets_its_targets(targets):
    images, labels = _validation()
    binary, spectral, verifier = CountingBinary(), CountingSpectral(), CountingVerifier()
    cascade = Cascade(binary, spectral, verifier)
    thresholds, record = calibrate(cascade, lambda i: images[i], labels, targets, batch_size=64)
    assert binary.images == len(images)  # stage 1 once per image
    calibrated = cascade.with_thresholds(thresholds, record)
    rates = _rates(calibrated.score(images), labels)
    by_name = {(s["stage"], s["rate"], s["threshold"]): s for s in record["stages"]}
    for name, (hits, total) in rates.items():
        target = getattr(targets, name)
        assert total > 20, name
        assert hits / total <= target + 1e-12, (name, hits, total)
        assert hits / total > target - 1.0 / total - 1e-12, (name, hits, total)  # tightest: one more would exceed
    assert all(s["met"] for s in record["stages"])
    assert by_name[("binary", "fnr", "t1_binary_min")]["achieved"] == pytest.approx(
        rates["binary_fnr"][0] / rates["binary_fnr"][1])
    assert record["thresholds"]["t1_binary_min"] == thresholds.t1_binary_min > 0.0
    assert thresholds.t3_mllm_uncertain <= thresholds.t3_mllm_synthetic
    assert record["reached"]["spectral"] == sum(1 for img in images if img.info["b"] >= thresholds.t1_binary_min)


def test_code_literal_keeps_the_uncertain_threshold():
    images, labels = _validation(n=120)
    cascade = Cascade(CountingBinary(), CountingSpectral(), CountingVerifier(), mllm_mapping="code_literal")
    thresholds, record = calibrate(cascade, lambda i: images[i], labels, CalibrationTargets())
    assert thresholds.t3_mllm_uncertain == min(0.5, thresholds.t3_mllm_synthetic)
    assert [s["threshold"] for s in record["stages"]] == ["t1_binary_min", "t2_spectral", "t3_mllm_synthetic"]


def test_threshold_rules_on_hand_worked_scores():
    fakes = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert threshold_for_fnr(fakes, 0.0) == 0.1  # nothing below
    assert threshold_for_fnr(fakes, 0.2) == 0.3  # 0.1 and 0.2 below: 2 of 10
    assert threshold_for_fnr(fakes, 0.25) == 0.3
    assert threshold_for_fnr([], 0.1) is None
    reals = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    t = threshold_for_fpr(reals, 0.1)  # one real (0.9) may be at or above
    assert 0.8 < t <= np.nextafter(0.8, 1) and sum(r >= t for r in reals) == 1
    assert threshold_for_fpr([1.0, 1.0, 0.2], 0.0) == 1.0  # cannot go above 1: the target is out of reach


def test_unreachable_block_target_is_reported_not_hidden():
    images = [scored_image(0.9, 0.9, 1.0, seed=i) for i in range(6)]
    labels = [0, 0, 0, 1, 1, 1]
    thresholds, record = calibrate(Cascade(CountingBinary(), CountingSpectral(), CountingVerifier()),
                                   lambda i: images[i], labels, CalibrationTargets(block_fpr=0.0))
    block = next(s for s in record["stages"] if s["threshold"] == "t3_mllm_synthetic")
    assert thresholds.t3_mllm_synthetic == 1.0 and block["met"] is False and block["achieved"] == 1.0


def test_a_stage_no_fake_reaches_keeps_its_threshold():
    images = [scored_image(0.1 * i, 0.9, 0.9, seed=i) for i in range(4)]
    _, record = calibrate(Cascade(CountingBinary(), CountingSpectral(), CountingVerifier()), lambda i: images[i],
                          [0, 0, 0, 0], CalibrationTargets())
    first = record["stages"][0]
    assert first["calibrated"] is False and "no fake" in first["reason"] and first["value"] == 0.30


def test_targets_are_validated():
    with pytest.raises(ConfigError, match="block_fpr"):
        CalibrationTargets(block_fpr=1.0).validate()
