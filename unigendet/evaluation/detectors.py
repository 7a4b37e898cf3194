"""The one interface every detection benchmark scores: images in, p(fake) and (optionally) an explanation out.

:class:`ImageDetector` is what the harness (:mod:`unigendet.evaluation.harness`) calls. Our model plugs in
through :class:`UniGenDetImageDetector` (detection-head p(fake) + generated explanation, greedy by default);
a baseline that only produces a probability plugs in through :class:`ProbabilityDetector` and simply has no
text (its text metrics are then left out of the reports).

Labels are internal: ``0 = real, 1 = fake``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from unigendet.metrics.fakeclue import parse_verdict


@dataclass(frozen=True)
class DetectorOutput:
    """One image's result. ``p_fake`` is NaN when the detector has no score; ``text`` None when it does not
    explain; ``text_label`` is the verdict parsed from ``text`` (internal label) or None when unparsable."""

    p_fake: float = math.nan
    text: str | None = None
    text_label: int | None = None


@runtime_checkable
class ImageDetector(Protocol):
    """``score(images, questions)`` -> one :class:`DetectorOutput` per image.

    ``questions[i]`` is the question asked about image ``i`` (None: the detector's default); detectors
    without a language side ignore it. ``describe()`` returns the settings that change the outputs (it is
    part of the job fingerprint, so a resumed job cannot mix outputs of differently configured detectors).
    An optional ``model`` attribute (a ``torch.nn.Module``) lets reports record dtype and device.
    """

    def score(self, images: Sequence[Image.Image],
              questions: Sequence[str | None] | None = None) -> list[DetectorOutput]: ...

    def describe(self) -> dict[str, Any]: ...


class UniGenDetImageDetector:
    """Adapter over :class:`unigendet.inference.detect.Detector` (or anything with its ``detect`` signature).

    ``max_new_tokens=0`` scores with the head only (no explanation, so no text metrics). The text verdict is
    re-parsed from the text with the FakeClue rule so every detector is judged by the same parser.
    """

    def __init__(self, detector, max_new_tokens: int = 256, decoding=None, seed: int = 42):
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.detector = detector
        self.max_new_tokens = max_new_tokens
        self.decoding = decoding
        self.seed = seed

    @property
    def model(self):
        return getattr(self.detector, "model", None)

    def describe(self) -> dict[str, Any]:
        return {
            "detector": "unigendet",
            "max_new_tokens": self.max_new_tokens,
            "decoding": asdict(self.decoding) if self.decoding is not None else "greedy",
            "seed": self.seed,
            **_preprocessing(self.detector),
        }

    def score(self, images: Sequence[Image.Image],
              questions: Sequence[str | None] | None = None) -> list[DetectorOutput]:
        images = list(images)
        if not images:
            return []
        asked = _questions_or_default(questions, len(images))
        results = self.detector.detect(images, questions=asked, max_new_tokens=self.max_new_tokens,
                                       decoding=self.decoding, seed=self.seed)
        outputs = []
        for res in results:
            text = res.text if self.max_new_tokens > 0 else None
            outputs.append(DetectorOutput(float(res.p_fake), text, None if text is None else parse_verdict(text)))
        return outputs


def _preprocessing(detector) -> dict[str, Any]:
    """The Detector options that change what the model sees (absent attributes are skipped)."""
    out: dict[str, Any] = {k: getattr(detector, k) for k in ("posterior", "pre_resize_vae", "threshold")
                           if hasattr(detector, k)}
    encoder = getattr(detector, "encoder", None)
    if encoder is not None:
        out["smsa"] = getattr(encoder, "smsa", None)
        for name in ("vit_transform", "vae_transform"):
            transform = getattr(encoder, name, None)
            if is_dataclass(transform):
                out[name] = asdict(transform)
    parameters = getattr(getattr(detector, "model", None), "parameters", None)
    param = next(iter(parameters()), None) if callable(parameters) else None
    if param is not None:
        out["dtype"] = str(param.dtype).removeprefix("torch.")
    return out


def _questions_or_default(questions: Sequence[str | None] | None, n: int) -> list[str]:
    from unigendet.inference.detect import DEFAULT_QUESTION

    if questions is None:
        return [DEFAULT_QUESTION] * n
    if len(questions) != n:
        raise ValueError(f"{len(questions)} questions for {n} images")
    return [DEFAULT_QUESTION if q is None else q for q in questions]


class ProbabilityDetector:
    """A score-only detector (a baseline classifier): ``fn(images) -> p(fake) per image``; no explanation."""

    def __init__(self, fn: Callable[[list[Image.Image]], Sequence[float]], name: str, settings: dict | None = None):
        self.fn = fn
        self.name = name
        self.settings = dict(settings or {})

    def describe(self) -> dict[str, Any]:
        return {"detector": self.name, **self.settings}

    def score(self, images: Sequence[Image.Image],
              questions: Sequence[str | None] | None = None) -> list[DetectorOutput]:
        images = list(images)
        scores = list(self.fn(images))
        if len(scores) != len(images):
            raise ValueError(f"{self.name}: {len(scores)} scores for {len(images)} images")
        return [DetectorOutput(float(p)) for p in scores]


def as_image_detector(detector, max_new_tokens: int = 256, decoding=None, seed: int = 42) -> ImageDetector:
    """``detector`` itself when it already is an :class:`ImageDetector`, else our model's ``Detector`` wrapped
    with the given generation settings."""
    if isinstance(detector, ImageDetector):
        return detector
    if not hasattr(detector, "detect"):
        raise TypeError(f"{type(detector).__name__} is neither an ImageDetector (score/describe) nor a Detector")
    return UniGenDetImageDetector(detector, max_new_tokens=max_new_tokens, decoding=decoding, seed=seed)
