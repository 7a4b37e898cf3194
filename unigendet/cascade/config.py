"""The cascade's settings: where each stage's weights are, the routing thresholds and how the verifier's score
maps to a decision.

Routing, all scores being probabilities of "fake" in [0, 1] (``b``: stage 1, ``s``: spectral stage, ``m``: verifier):

* ``b < t1_binary_min`` -> PASS at stage 1; otherwise the spectral stage runs;
* ``s < t2_spectral`` -> PASS (flag ``low_risk``); otherwise the verifier runs;
* ``m >= t3_mllm_synthetic`` -> BLOCK; below it ``mllm_mapping`` decides:
  ``flowchart`` (default): ``t3_mllm_uncertain <= m`` -> ESCALATE, ``m < t3_mllm_uncertain`` -> PASS (``cleared``);
  ``code_literal``: ``m < t3_mllm_uncertain`` -> ESCALATE, otherwise PASS (``cleared``). The published pipeline's
  code does the latter while its flow chart describes the former; ``code_literal`` exists to reproduce the code.

``t1_binary_synthetic`` is kept because the published pipeline declares it ("high-confidence synthetic"), but it has
**no effect**: every image with ``b >= t1_binary_min`` already goes on to the spectral stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import read_meta
from unigendet.inference.detect import DEFAULT_SEED
from unigendet.inference.loading import ModelSource, require_paths

MAPPINGS = ("flowchart", "code_literal")
VERIFIER_UNIGENDET = "unigendet"
VERIFIER_STUB = "stub_spectral_peak"


@dataclass
class Thresholds:
    """Routing thresholds (see the module docstring); ``t1_binary_synthetic`` is declared but unused."""

    t1_binary_min: float = 0.30
    t1_binary_synthetic: float = 0.75  # no effect: every b >= t1_binary_min already goes to the spectral stage
    t2_spectral: float = 0.55
    t3_mllm_synthetic: float = 0.80
    t3_mllm_uncertain: float = 0.50

    def validate(self) -> None:
        for name in ("t1_binary_min", "t1_binary_synthetic", "t2_spectral", "t3_mllm_synthetic", "t3_mllm_uncertain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 \
                    or math.isnan(value):
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.t3_mllm_uncertain > self.t3_mllm_synthetic:
            raise ConfigError(f"t3_mllm_uncertain ({self.t3_mllm_uncertain}) must not exceed t3_mllm_synthetic "
                              f"({self.t3_mllm_synthetic})")


@dataclass
class VerifierConfig:
    """Stage 3. ``kind: unigendet``: our model from ``model`` (head p(fake) and a greedy explanation of up to
    ``max_new_tokens`` tokens, asked ``question``, None: the detector's default FakeClue-style question).
    ``kind: stub_spectral_peak``: a deterministic stand-in for tests and tiny runs, not a model: p(fake) =
    sigmoid((peak - stub_center) / stub_width), where peak is the strongest high-frequency peak of the spectral map
    (its largest excess over the local median beyond normalised radius ``stub_hf_radius``)."""

    kind: Literal["unigendet", "stub_spectral_peak"] = VERIFIER_UNIGENDET
    model: ModelSource | None = None
    max_new_tokens: int = 64
    question: str | None = None
    seed: int = DEFAULT_SEED
    stub_center: float = 1.0
    stub_width: float = 0.25
    stub_hf_radius: float = 0.25

    def validate(self) -> None:
        if self.kind == VERIFIER_UNIGENDET and self.model is None:
            raise ConfigError("model: the unigendet verifier needs model.path (a model directory)")
        if self.kind == VERIFIER_STUB and self.model is not None:
            raise ConfigError("model: the stub verifier loads no model; leave model unset")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.stub_width > 0 or not math.isfinite(self.stub_center):
            raise ConfigError("stub_width must be > 0 and stub_center finite")
        if not 0.0 <= self.stub_hf_radius < 1.0:
            raise ConfigError(f"stub_hf_radius must be in [0, 1), got {self.stub_hf_radius}")


@dataclass
class CascadeConfig:
    """The whole cascade. ``binary``: a directory written by ``save_pretrained`` of any registered detector
    (``binary_backbone``: its backbone directory when saved without it); ``spectral``: a saved ``spectral``
    detector; ``verifier``: stage 3. ``batch_size``: images per stage-1 forward. ``device``: where the stage-1
    and spectral detectors run (default cuda when available, else cpu; the UniGenDet verifier uses its
    ``model.device``)."""

    binary: str
    spectral: str
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    mllm_mapping: Literal["flowchart", "code_literal"] = "flowchart"
    feed_spectral_map: bool = False
    binary_backbone: str | None = None
    batch_size: int = 32
    device: str | None = None

    def validate(self) -> None:
        if self.mllm_mapping not in MAPPINGS:
            raise ConfigError(f"mllm_mapping must be one of {MAPPINGS}, got {self.mllm_mapping!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.feed_spectral_map and self.verifier.kind != VERIFIER_UNIGENDET:
            raise ConfigError(f"feed_spectral_map applies to the unigendet verifier, not {self.verifier.kind!r}")

    def check_inputs(self, key: str = "cascade") -> None:
        """ConfigError naming the key of a stage directory that is missing or holds something else."""
        require_paths({f"{key}.binary": self.binary, f"{key}.spectral": self.spectral,
                       f"{key}.binary_backbone": self.binary_backbone})
        for name in ("binary", "spectral"):
            try:
                meta = read_meta(Path(getattr(self, name)))
            except ConfigError as err:
                raise ConfigError(f"{key}.{name}: {err}") from None
            if name == "spectral" and meta["detector"] != "spectral":
                raise ConfigError(f"{key}.spectral: {self.spectral} holds a saved {meta['detector']!r} detector, "
                                  "not a spectral one")
        if self.verifier.model is not None:
            self.verifier.model.check_inputs(f"{key}.verifier.model")
