"""Stage 3 of the cascade: a verifier turns an image (and its spectral map) into p(fake), an explanation and a raw
record.

* :class:`UniGenDetVerifier` asks our model. p(fake) is the detection head's probability of "fake", read through
  :func:`unigendet.models.bridges.fake_probability`, which knows the head's class order (UniGenDet's 2-way head, as
  FakeClue's labels, puts fake at index 0 and real at index 1; the probability returned is always that of *fake*).
  The explanation is greedy decoding. A model without a detection head only has its text: "this is a fake image"
  gives p(fake) = 1 and "this is a real image" 0 (the thresholds then act as a hard rule), and an answer with
  neither phrase gives no score, which the cascade escalates.
* :class:`StubSpectralPeakVerifier` is **not a model**: a deterministic function of the spectral map's strongest
  high-frequency peak, for tests and tiny runs where no trained model is at hand.

A verifier has ``verify(images, spectral_maps, questions=None) -> list[Verification]`` and ``describe()``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unigendet.cascade.config import VERIFIER_STUB, VERIFIER_UNIGENDET, VerifierConfig
from unigendet.detectors.spectral import peak_features, spectral_map_image
from unigendet.inference.detect import DEFAULT_QUESTION, DecodingConfig
from unigendet.labels import LABEL_FAKE, label_name, parse_verdict
from unigendet.utils.fingerprint import weights_fingerprint


@dataclass(frozen=True)
class Verification:
    """What a verifier says about one image: ``p_fake`` (None: no usable verdict), ``explanation`` and ``raw``."""

    p_fake: float | None
    explanation: str | None
    raw: dict[str, Any]


def text_probability(text: str | None) -> float | None:
    """p(fake) from an answer's verdict alone: 1.0 for "this is a fake image", 0.0 for "this is a real image"
    (:func:`~unigendet.labels.parse_verdict`), None when the answer says neither."""
    verdict = None if text is None else parse_verdict(text)
    return None if verdict is None else float(verdict == LABEL_FAKE)


def verifier_weights_fingerprint(directory: str | Path | None, extra: str | Path | None = None) -> str | None:
    """Fingerprint over every byte of the model directory's weights (and of ``extra``, a weights file over it),
    cached by path, size and mtime (:func:`unigendet.utils.fingerprint.weights_fingerprint`)."""
    parts = [weights_fingerprint(directory), weights_fingerprint(extra)]
    found = [p for p in parts if p is not None]
    if not found:
        return None
    return found[0] if len(found) == 1 else hashlib.sha256("|".join(found).encode()).hexdigest()


class UniGenDetVerifier:
    """Stage 3 over :class:`unigendet.inference.detect.UniGenDetDetector` (or anything with its ``detect``)."""

    def __init__(self, detector, max_new_tokens: int = 64, question: str | None = None, seed: int = 42,
                 feed_spectral_map: bool = False, weights: str | None = None):
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.detector = detector
        self.max_new_tokens = max_new_tokens
        self.question = question or DEFAULT_QUESTION
        self.seed = seed
        self.weights = weights
        self.feed_spectral_map = feed_spectral_map

    @property
    def model(self):
        return getattr(self.detector, "model", None)

    def describe(self) -> dict[str, Any]:
        settings = getattr(self.detector, "settings", None)
        return {"kind": VERIFIER_UNIGENDET, "max_new_tokens": self.max_new_tokens, "question": self.question,
                "seed": self.seed, "decoding": "greedy", "weights": self.weights,
                "feed_spectral_map": self.feed_spectral_map,
                **(settings() if callable(settings) else {})}

    def verify(self, images: Sequence[Image.Image], spectral_maps: Sequence[torch.Tensor | None],
               questions: Sequence[str | None] | None = None) -> list[Verification]:
        images = list(images)
        if not images:
            return []
        asked = [self.question if questions is None or q is None else q for q in (questions or [None] * len(images))]
        extra = {}
        if self.feed_spectral_map:
            # The map as a second image for the understanding side, after the image itself (experimental: the
            # model was never trained with it). An image without a map gets none.
            extra["extra_images"] = [[] if m is None else [spectral_map_image(m)] for m in spectral_maps]
        results = self.detector.detect(images, questions=asked, max_new_tokens=self.max_new_tokens,
                                       decoding=DecodingConfig.greedy(), seed=self.seed, **extra)
        return [self._verification(result) for result in results]

    def _verification(self, result) -> Verification:
        text = result.text if self.max_new_tokens > 0 else None
        verdict = None if text is None else parse_verdict(text)
        head = float(result.p_fake)
        if math.isfinite(head):
            p_fake, source = head, "head"
        else:
            p_fake = text_probability(text)
            source = "text" if p_fake is not None else "none"
        raw = {"source": source,
               "head_p_fake": head if math.isfinite(head) else None,
               "head_p_real": 1.0 - head if math.isfinite(head) else None,
               "text_verdict": None if verdict is None else label_name(verdict),
               "stopped": bool(getattr(result, "stopped", False)),
               "n_tokens": len(getattr(result, "token_ids", []) or [])}
        return Verification(p_fake, text, raw)


class StubSpectralPeakVerifier:
    """A deterministic stand-in for stage 3 (not a model): p(fake) = sigmoid((peak - center) / width), peak being
    the largest excess of the spectral map over its local median (``kernel`` x ``kernel``) beyond normalised radius
    ``hf_radius``: periodic generator artefacts are isolated bright bins, smooth photographs have none."""

    def __init__(self, center: float = 1.0, width: float = 0.25, hf_radius: float = 0.25, kernel: int = 5):
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.center, self.width, self.hf_radius, self.kernel = center, width, hf_radius, kernel

    model = None

    def describe(self) -> dict[str, Any]:
        return {"kind": VERIFIER_STUB, "center": self.center, "width": self.width, "hf_radius": self.hf_radius,
                "kernel": self.kernel}

    def peak_strength(self, spectral_map: torch.Tensor) -> float:
        return float(peak_features(spectral_map.float(), self.kernel, self.hf_radius, 1.0)[0])

    def verify(self, images: Sequence[Image.Image], spectral_maps: Sequence[torch.Tensor | None],
               questions: Sequence[str | None] | None = None) -> list[Verification]:
        out = []
        for spectral_map in spectral_maps:
            if spectral_map is None:
                raise ValueError("the stub verifier needs each image's spectral map")
            peak = self.peak_strength(spectral_map)
            p_fake = 1.0 / (1.0 + math.exp(-(peak - self.center) / self.width))
            text = (f"stub verifier (not a model): strongest high-frequency spectral peak {peak:.3f} above the local "
                    f"median gives p(fake) {p_fake:.3f}")
            out.append(Verification(p_fake, text, {"source": VERIFIER_STUB, "peak_strength": peak}))
        return out


def build_verifier(cfg: VerifierConfig, feed_spectral_map: bool = False, device: str | None = None):
    """The verifier ``cfg`` names; the UniGenDet model is loaded from ``cfg.model`` (its ``device`` unless
    ``device`` is given)."""
    if cfg.kind == VERIFIER_STUB:
        return StubSpectralPeakVerifier(cfg.stub_center, cfg.stub_width, cfg.stub_hf_radius)
    source = cfg.model
    if device is not None and source.device is None:
        source = replace(source, device=device)
    detector = source.load_detector()
    return UniGenDetVerifier(detector, cfg.max_new_tokens, cfg.question, cfg.seed, feed_spectral_map=feed_spectral_map,
                             weights=verifier_weights_fingerprint(source.path, source.weights))
