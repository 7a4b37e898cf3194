"""Choosing the cascade's thresholds on a labelled validation split.

Each threshold is set on the images that *reach* its stage, in stage order (the images reaching stage 2 depend on
the stage-1 threshold just chosen, and so on):

* ``t1_binary_min``: the largest value for which the share of fakes reaching stage 1 (all of them) that it lets
  through (score below the threshold) is at most ``binary_fnr``: as many reals as possible leave early while the
  fakes lost there stay within the target;
* ``t2_spectral``: the same rule with ``spectral_fnr`` on the images that reach the spectral stage;
* ``t3_mllm_synthetic``: the smallest value for which the share of reals reaching the verifier that it blocks
  (score at or above the threshold) is at most ``block_fpr``;
* ``t3_mllm_uncertain`` (``flowchart`` mapping, where scores below it are cleared): the largest value for which the
  share of fakes reaching the verifier that it clears is at most ``cleared_fnr``, capped at ``t3_mllm_synthetic``.
  Under ``code_literal`` the scores below it are escalated, not let through, so it keeps its configured value.

With k = floor(target x n), an FNR threshold is the (k+1)-th smallest fake score (at most k fakes score strictly
below it) and an FPR threshold lies just above the (k+1)-th largest real score (at most k reals score at or above
it). A threshold whose stage sees no image of the class it is set on keeps its value, and the record says why.
A threshold cannot exceed 1, so when more than k reals score exactly 1.0 the block target cannot be met; the
record then says ``met: false``. The record holds the targets, the thresholds and the rates achieved on the split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from PIL import Image

from unigendet.cascade.config import Thresholds
from unigendet.config.loader import ConfigError
from unigendet.labels import LABEL_FAKE, LABEL_REAL

logger = logging.getLogger(__name__)


@dataclass
class CalibrationTargets:
    """Target error rates, each on the images that reach the stage it is set at (see the module docstring)."""

    binary_fnr: float = 0.05  # fakes stage 1 lets through / fakes reaching stage 1
    spectral_fnr: float = 0.05  # fakes the spectral stage lets through / fakes reaching it
    block_fpr: float = 0.05  # reals blocked / reals reaching the verifier
    cleared_fnr: float = 0.05  # flowchart: fakes cleared by the verifier / fakes reaching it

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be a rate in [0, 1), got {value!r}")


def threshold_for_fnr(fake_scores: Sequence[float], target: float) -> float | None:
    """The largest threshold t with #{fake score < t} <= floor(target x n); None without fakes."""
    if not fake_scores:
        return None
    ordered = sorted(float(s) for s in fake_scores)
    k = math.floor(target * len(ordered) + 1e-9)
    return ordered[min(k, len(ordered) - 1)]


def threshold_for_fpr(real_scores: Sequence[float], target: float) -> float | None:
    """The smallest threshold t <= 1 with #{real score >= t} <= floor(target x n) where one exists (else 1.0);
    None without reals."""
    if not real_scores:
        return None
    ordered = sorted((float(s) for s in real_scores), reverse=True)
    k = math.floor(target * len(ordered) + 1e-9)
    if k >= len(ordered):
        return 0.0
    return min(1.0, math.nextafter(ordered[k], math.inf))


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _stage_record(name: str, rate_name: str, target: float, threshold_key: str, value: float,
                  hits: int, total: int, calibrated: bool, reason: str | None = None) -> dict:
    achieved = _rate(hits, total)
    return {"stage": name, "threshold": threshold_key, "value": value, "calibrated": calibrated,
            "rate": rate_name, "target": target, "achieved": achieved, "count": hits, "of": total,
            "met": None if achieved is None else achieved <= target + 1e-12, "reason": reason}


def calibrate(cascade, load_image: Callable[[int], Image.Image], labels: Sequence[int],
              targets: CalibrationTargets, batch_size: int = 32) -> tuple[Thresholds, dict]:
    """Thresholds for ``cascade`` from a validation split of ``len(labels)`` images (``load_image(i)``: image i,
    loaded when needed; ``labels``: internal, 1 = fake) and the record of what they achieve there.

    Runs stage 1 on every image, the spectral stage on those the new stage-1 threshold sends on, and the verifier
    on those the new spectral threshold sends on. The spectral maps the verifier reads are computed again for
    those images rather than kept for every image (a map of a 512-pixel image is a megabyte)."""
    targets.validate()
    labels = [int(y) for y in labels]
    if any(y not in (LABEL_REAL, LABEL_FAKE) for y in labels):
        raise ValueError("labels must be internal labels (0 = real, 1 = fake)")
    n = len(labels)
    if n == 0:
        raise ValueError("calibration needs at least one validation image")
    old = cascade.thresholds
    stages = []

    binary = _in_batches(cascade.binary_scores, load_image, range(n), batch_size)
    t1, rec = _fnr_stage("binary", "t1_binary_min", old.t1_binary_min, targets.binary_fnr, binary, labels, range(n))
    stages.append(rec)

    reach2 = [i for i in range(n) if binary[i] >= t1]
    spectral = {i: float(a.score) for i, (a, _) in zip(reach2, cascade.spectral_analyses([load_image(i)
                                                                                          for i in reach2]))}
    t2, rec = _fnr_stage("spectral", "t2_spectral", old.t2_spectral, targets.spectral_fnr, spectral, labels, reach2)
    stages.append(rec)

    reach3 = [i for i in reach2 if spectral[i] >= t2]
    mllm = _verifier_scores(cascade, load_image, reach3, batch_size)
    scored3 = [i for i in reach3 if mllm[i] is not None]
    reals3 = [mllm[i] for i in scored3 if labels[i] == LABEL_REAL]
    t3 = threshold_for_fpr(reals3, targets.block_fpr)
    calibrated3 = t3 is not None
    t3 = old.t3_mllm_synthetic if t3 is None else t3
    blocked = sum(mllm[i] >= t3 for i in scored3 if labels[i] == LABEL_REAL)
    stages.append(_stage_record("mllm", "fpr", targets.block_fpr, "t3_mllm_synthetic", t3, blocked, len(reals3),
                                calibrated3, None if calibrated3 else "no real image with a verifier score "
                                "reached the verifier"))

    t_unc = old.t3_mllm_uncertain
    if cascade.mllm_mapping == "flowchart":
        t_unc, rec = _fnr_stage("mllm", "t3_mllm_uncertain", old.t3_mllm_uncertain, targets.cleared_fnr,
                                mllm, labels, scored3, cap=t3)
        stages.append(rec)
    else:
        t_unc = min(t_unc, t3)
    thresholds = replace(old, t1_binary_min=t1, t2_spectral=t2, t3_mllm_synthetic=t3, t3_mllm_uncertain=t_unc)
    thresholds.validate()
    record = {"targets": asdict(targets), "thresholds": asdict(thresholds), "previous_thresholds": asdict(old),
              "mllm_mapping": cascade.mllm_mapping, "n_images": n, "n_fake": sum(labels),
              "n_real": n - sum(labels), "reached": {"binary": n, "spectral": len(reach2), "mllm": len(reach3)},
              "n_no_verdict": len(reach3) - len(scored3), "stages": stages}
    for stage in stages:
        if stage["met"] is False:
            logger.warning("calibration: %s %s target %.4f not met (achieved %.4f: too many scores tied at 1.0)",
                           stage["stage"], stage["rate"], stage["target"], stage["achieved"])
    return thresholds, record


def _fnr_stage(stage: str, key: str, old: float, target: float, scores, labels: Sequence[int], reached,
               cap: float | None = None) -> tuple[float, dict]:
    """Threshold and record of an exit that lets images below it through, set on the fakes that reached it."""
    fakes = [scores[i] for i in reached if labels[i] == LABEL_FAKE]
    value = threshold_for_fnr(fakes, target)
    calibrated = value is not None
    value = old if value is None else value
    if cap is not None:
        value = min(value, cap)
    missed = sum(s < value for s in fakes)
    reason = None if calibrated else f"no fake image reached the {stage} stage"
    return value, _stage_record(stage, "fnr", target, key, value, missed, len(fakes), calibrated, reason)


def _in_batches(fn, load_image, indices, batch_size: int) -> list[float]:
    indices = list(indices)
    out: list[float] = []
    for start in range(0, len(indices), batch_size):
        out += fn([load_image(i) for i in indices[start:start + batch_size]])
    return out


def _verifier_scores(cascade, load_image, indices: Sequence[int], batch_size: int) -> dict[int, float | None]:
    scores: dict[int, float | None] = {}
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        images = [load_image(i) for i in chunk]
        maps = [a.map for a, _ in cascade.spectral_analyses(images)]
        for i, verdict in zip(chunk, cascade.verifier.verify(images, maps)):
            scores[i] = verdict.p_fake
    return scores
