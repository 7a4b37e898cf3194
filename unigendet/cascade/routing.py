"""The cascade's routing rules as pure functions of the stage scores and the thresholds."""

from __future__ import annotations

from unigendet.cascade.config import Thresholds
from unigendet.cascade.result import FLAG_CLEARED, FLAG_NO_VERDICT, Decision


def binary_exits(binary_score: float, thresholds: Thresholds) -> bool:
    """Stage 1 passes the image (the spectral stage does not run) when its score is below ``t1_binary_min``."""
    return binary_score < thresholds.t1_binary_min


def spectral_exits(spectral_score: float, thresholds: Thresholds) -> bool:
    """The spectral stage passes the image (low risk; the verifier does not run) below ``t2_spectral``."""
    return spectral_score < thresholds.t2_spectral


def verifier_decision(mllm_confidence: float | None, thresholds: Thresholds,
                      mapping: str) -> tuple[Decision, list[str]]:
    """(decision, flags) from the verifier's p(fake); None (no score and no parsable verdict) escalates.

    ``m >= t3_mllm_synthetic`` blocks under both mappings. Below it, ``flowchart`` escalates from
    ``t3_mllm_uncertain`` up and clears what is below; ``code_literal`` escalates below ``t3_mllm_uncertain`` and
    clears what is between the two thresholds."""
    if mllm_confidence is None:
        return Decision.ESCALATE, [FLAG_NO_VERDICT]
    if mllm_confidence >= thresholds.t3_mllm_synthetic:
        return Decision.BLOCK, []
    uncertain = mllm_confidence >= thresholds.t3_mllm_uncertain
    if mapping == "flowchart":
        return (Decision.ESCALATE, []) if uncertain else (Decision.PASS, [FLAG_CLEARED])
    if mapping == "code_literal":
        return (Decision.PASS, [FLAG_CLEARED]) if uncertain else (Decision.ESCALATE, [])
    raise ValueError(f"unknown mllm_mapping {mapping!r}")
