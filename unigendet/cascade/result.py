"""What the tiered cascade says about one image: a moderation decision, the stage that took it, every stage's
score, flags, per-stage latency and (not serialised) the spectral map.

:class:`CascadeResult` is a :class:`~unigendet.labels.DetectionResult`, so everything that scores detectors takes it
unchanged: its ``p_fake`` is the *final score* (the score of the deepest stage that produced one) and its ``text``
the verifier's explanation (None when stage 3 did not run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from unigendet.labels import DetectionResult

STAGE_BINARY = "binary"
STAGE_SPECTRAL = "spectral"
STAGE_MLLM = "mllm"
STAGES = (STAGE_BINARY, STAGE_SPECTRAL, STAGE_MLLM)

FLAG_LOW_RISK = "low_risk"  # passed by the spectral stage
FLAG_CLEARED = "cleared"  # passed by the verifier
FLAG_LOSSY_INPUT = "lossy_input"  # JPEG input: 8x8 DCT blocks add spectral peaks of their own
FLAG_NO_VERDICT = "no_verdict"  # the verifier gave neither a score nor a parsable verdict: escalated


class Decision(str, Enum):
    """The moderation action: let the image through, block it, or send it to a person."""

    PASS = "pass"
    BLOCK = "block"
    ESCALATE = "escalate"


@dataclass(frozen=True, kw_only=True)
class CascadeResult(DetectionResult):
    """One image through the cascade.

    The first six fields keep the names, order and defaults of the published pipeline's result record
    (``image_id``, ``decision``, ``binary_score``, ``spectral_score``, ``mllm_confidence``, ``stage_exited``); the
    others are additions: ``flags`` (``low_risk``, ``cleared``, ``lossy_input``, ``no_verdict``), ``mllm_raw`` (what the
    verifier returned besides its score), ``spectral_map_ref`` (where the map was written, when it was),
    ``latency_ms`` (milliseconds per image for each stage that ran) and ``spectral_map`` (the float32 [H, W]
    log-magnitude map when the spectral stage ran; kept in memory only, left out of comparisons and records).
    All scores are probabilities of "fake" in [0, 1].
    """

    image_id: str
    decision: Decision
    binary_score: float
    spectral_score: float | None = None
    mllm_confidence: float | None = None
    stage_exited: str = STAGE_BINARY
    flags: list[str] = field(default_factory=list)
    mllm_raw: dict[str, Any] | None = None
    spectral_map_ref: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    spectral_map: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.stage_exited not in STAGES:
            raise ValueError(f"stage_exited must be one of {STAGES}, got {self.stage_exited!r}")
        if not isinstance(self.decision, Decision):
            object.__setattr__(self, "decision", Decision(self.decision))

    @property
    def final_score(self) -> float:
        """The score of the deepest stage that produced one (the ranking score for AUC / AP)."""
        return self.p_fake

    @property
    def explanation(self) -> str | None:
        """The verifier's explanation (None unless stage 3 ran and explains)."""
        return self.text

    @property
    def stages_run(self) -> tuple[str, ...]:
        return STAGES[: STAGES.index(self.stage_exited) + 1]

    def details(self) -> dict[str, Any]:
        """The per-image fields the cascade's metrics need, stored by the evaluation harness."""
        return {"decision": self.decision.value, "stage_exited": self.stage_exited,
                "binary_score": self.binary_score, "spectral_score": self.spectral_score,
                "mllm_confidence": self.mllm_confidence, "flags": list(self.flags),
                "latency_ms": dict(self.latency_ms)}

    def record(self) -> dict[str, Any]:
        """The JSON view: the detector record plus every cascade field (the decision as its string; the map
        itself is not included, only ``spectral_map_ref``)."""
        return {**super().record(), "image_id": self.image_id, "decision": self.decision.value,
                "binary_score": self.binary_score, "spectral_score": self.spectral_score,
                "mllm_confidence": self.mllm_confidence, "stage_exited": self.stage_exited,
                "final_score": None if math.isnan(self.p_fake) else self.p_fake, "flags": list(self.flags),
                "mllm_raw": self.mllm_raw, "spectral_map_ref": self.spectral_map_ref,
                "latency_ms": dict(self.latency_ms)}
