"""The one interface every detection benchmark scores: images in, p(fake) and (optionally) an explanation out.

:class:`ImageDetector` is what the harness (:mod:`unigendet.evaluation.harness`) calls. Our model plugs in
through :class:`UniGenDetImageDetector` (detection-head p(fake) + generated explanation, greedy by default);
a baseline that only produces a probability plugs in through :class:`ProbabilityDetector` and simply has no
text (its text metrics are then left out of the reports).

Every command that scores images names its detector in :class:`DetectorSource` (``model.detector``: ``unigendet``,
or a name of the baseline registry such as ``ltd``, ``corit``, ``spectral``) and gets it from
:func:`load_image_detector`: our model, or a saved baseline wrapped in
:class:`~unigendet.detectors.adapter.DetectorAdapter`.

Every detector returns :class:`~unigendet.labels.DetectionResult` (labels internal: ``0 = real, 1 = fake``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from unigendet.cascade import CASCADE, CASCADE_FILE, load_cascade
from unigendet.config.loader import ConfigError
from unigendet.detectors.adapter import DetectorAdapter, saved_detector_name
from unigendet.detectors.base import META_FILE, available_detectors
from unigendet.inference.detect import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_QUESTION, DEFAULT_SEED
from unigendet.inference.loading import DetectorOptions, ModelSource, require_paths, resolve_device
from unigendet.labels import DetectionResult, parse_verdict

UNIGENDET = "unigendet"


@runtime_checkable
class ImageDetector(Protocol):
    """``score(images, questions)`` -> one :class:`~unigendet.labels.DetectionResult` per image.

    ``questions[i]`` is the question asked about image ``i`` (None: the detector's default); detectors
    without a language side ignore it. ``describe()`` returns the settings that change the outputs (it is
    part of the job fingerprint, so a resumed job cannot mix outputs of differently configured detectors).
    An optional ``model`` attribute (a ``torch.nn.Module``) lets reports record dtype and device.
    """

    def score(self, images: Sequence[Image.Image],
              questions: Sequence[str | None] | None = None) -> list[DetectionResult]: ...

    def describe(self) -> dict[str, Any]: ...


class UniGenDetImageDetector:
    """Adapter over :class:`unigendet.inference.detect.UniGenDetDetector` (or anything with its ``detect``
    signature whose results have ``p_fake`` and ``text``).

    ``max_new_tokens=0`` scores with the head only (no explanation, so no text metrics). The text verdict is
    parsed from the text with the FakeClue rule (:func:`~unigendet.labels.parse_verdict`) so every detector is
    judged by the same parser; a result's ``label`` is the head's at 0.5, the threshold the metrics use.
    """

    def __init__(self, detector, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, decoding=None,
                 seed: int = DEFAULT_SEED):
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
              questions: Sequence[str | None] | None = None) -> list[DetectionResult]:
        images = list(images)
        if not images:
            return []
        asked = _questions_or_default(questions, len(images))
        results = self.detector.detect(images, questions=asked, max_new_tokens=self.max_new_tokens,
                                       decoding=self.decoding, seed=self.seed)
        outputs = []
        for res in results:
            text = res.text if self.max_new_tokens > 0 else None
            outputs.append(DetectionResult(float(res.p_fake), text, None if text is None else parse_verdict(text),
                                           token_ids=list(getattr(res, "token_ids", [])),
                                           stopped=bool(getattr(res, "stopped", False))))
        return outputs


def _preprocessing(detector) -> dict[str, Any]:
    """The detector's settings that change its outputs (``settings()``, when it has one) and the model's dtype."""
    settings = getattr(detector, "settings", None)
    out: dict[str, Any] = dict(settings()) if callable(settings) else {}
    parameters = getattr(getattr(detector, "model", None), "parameters", None)
    param = next(iter(parameters()), None) if callable(parameters) else None
    if param is not None:
        out["dtype"] = str(param.dtype).removeprefix("torch.")
    return out


def _questions_or_default(questions: Sequence[str | None] | None, n: int) -> list[str]:
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
              questions: Sequence[str | None] | None = None) -> list[DetectionResult]:
        images = list(images)
        scores = list(self.fn(images))
        if len(scores) != len(images):
            raise ValueError(f"{self.name}: {len(scores)} scores for {len(images)} images")
        return [DetectionResult(float(p)) for p in scores]


def as_image_detector(detector, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, decoding=None,
                      seed: int = DEFAULT_SEED) -> ImageDetector:
    """``detector`` itself when it already is an :class:`ImageDetector`, else our model's
    :class:`~unigendet.inference.detect.UniGenDetDetector` wrapped with the given generation settings."""
    if isinstance(detector, ImageDetector):
        return detector
    if not hasattr(detector, "detect"):
        raise TypeError(f"{type(detector).__name__} is neither an ImageDetector (score/describe) nor has detect()")
    return UniGenDetImageDetector(detector, max_new_tokens=max_new_tokens, decoding=decoding, seed=seed)


# --------------------------------------------------------------------------------------------------
# Which detector a command scores with


def detector_names() -> list[str]:
    """``unigendet``, every registered baseline detector and ``cascade`` (a saved tiered cascade)."""
    return [UNIGENDET, *available_detectors(), CASCADE]


@dataclass
class DetectorSource(ModelSource):
    """The detector a command scores with and where its weights are: ``detector: unigendet`` (default) loads
    our model from ``path`` (an exported directory, or a BAGEL/UniGenDet one with ``bagel``); any other name
    (``ltd``, ``corit``, ``spectral``, ...) loads the baseline saved in ``path`` with ``save_pretrained``, whose
    ``detector.json`` must name that detector. Baselines run in float32 and only give p(fake). ``detector: cascade``
    loads the tiered cascade saved in ``path`` (its ``cascade.json`` names its stages and their settings)."""

    detector: str = UNIGENDET
    backbone_path: str | None = None  # a baseline saved without its frozen backbone: the backbone's directory

    @property
    def is_unigendet(self) -> bool:
        return self.detector == UNIGENDET

    def validate(self) -> None:
        if self.quantize != "none" and not self.is_unigendet:  # before the parent asks for bitsandbytes
            raise ConfigError(f"quantize: {self.quantize!r} applies to unigendet only, not {self.detector!r}")
        if self.device_map is not None and not self.is_unigendet:
            raise ConfigError(f"device_map applies to unigendet only, not {self.detector!r}")
        super().validate()
        if self.detector not in detector_names():
            raise ConfigError(f"detector: unknown detector {self.detector!r}; known: {', '.join(detector_names())}")
        if self.is_unigendet:
            if self.backbone_path is not None:
                raise ConfigError("backbone_path applies to baseline detectors only (detector: ltd, corit, ...)")
            return
        if self.bagel or self.weights is not None:
            raise ConfigError(f"bagel and weights apply to detector unigendet only, not {self.detector!r}")
        if self.detector == CASCADE and self.backbone_path is not None:
            raise ConfigError("backbone_path: a cascade names its stages' directories in its cascade.json")
        if self.dtype not in ("fp32", "auto"):
            raise ConfigError(f"dtype: baseline detectors run in fp32; {self.dtype!r} applies to unigendet only")

    def check_inputs(self, key: str = "model") -> None:
        super().check_inputs(key)
        require_paths({f"{key}.backbone_path": self.backbone_path})
        self.check_saved_detector(key)

    def check_saved_detector(self, key: str = "model") -> None:
        """ConfigError (one line, naming the keys) when ``path`` holds another detector than ``detector``."""
        path = Path(self.path)
        if self.detector == CASCADE:
            if not (path / CASCADE_FILE).is_file():
                raise ConfigError(f"{key}.path: {path} is not a saved cascade (no {CASCADE_FILE})")
            return
        if (path / CASCADE_FILE).is_file():
            raise ConfigError(f"{key}.path: {path} holds a saved cascade; set {key}.detector: cascade "
                              "(--detector cascade)")
        if self.is_unigendet:
            if (path / META_FILE).is_file():
                found = saved_detector_name(path)
                raise ConfigError(f"{key}.path: {path} holds a saved {found!r} detector; set {key}.detector: "
                                  f"{found} (--detector {found})")
            return
        try:
            found = saved_detector_name(path)
        except ConfigError as err:
            raise ConfigError(f"{key}.path: {err} ({key}.detector is {self.detector!r})") from None
        if found != self.detector:
            raise ConfigError(f"{key}.path: {path} holds a saved {found!r} detector, not {self.detector!r} "
                              f"({key}.detector)")


def baseline_options_unset(options: DetectorOptions | None, key: str = "detector") -> None:
    """ConfigError when UniGenDet's preprocessing choices are set for a baseline detector (they would be ignored)."""
    chosen = [f.name for f in fields(DetectorOptions) if options is not None and getattr(options, f.name) is not None]
    if chosen:
        raise ConfigError(f"{', '.join(f'{key}.{name}' for name in chosen)}: UniGenDet's preprocessing choices do not "
                          "apply to a baseline detector")


def load_image_detector(source: DetectorSource, options: DetectorOptions | None = None, *,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, decoding=None, seed: int = DEFAULT_SEED,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> ImageDetector:
    """The detector ``source`` names, ready for the harness: our model (head p(fake) and an explanation of up
    to ``max_new_tokens`` tokens, ``decoding`` and ``seed``, preprocessing ``options``), or a saved baseline
    (p(fake) only, scored ``batch_size`` images at a time on ``source.device``)."""
    if source.is_unigendet:
        return UniGenDetImageDetector(source.load_detector(options), max_new_tokens=max_new_tokens,
                                      decoding=decoding, seed=seed)
    baseline_options_unset(options)
    source.check_saved_detector()
    if source.detector == CASCADE:  # its verifier's settings (tokens, seed) are in its cascade.json
        return load_cascade(source.path, device=source.device)
    return DetectorAdapter.load(source.path, source.detector, backbone_path=source.backbone_path,
                                device=resolve_device(source.device), batch_size=batch_size)
