"""A registered detector seen through the evaluation suite's image-detector interface.

The harness calls ``score(images, questions) -> list[DetectionResult]`` and ``describe()``. Baseline detectors
only produce a probability: each result has ``p_fake`` (and the threshold that turns it into a label) and no
explanation text. :meth:`DetectorAdapter.load` opens a saved detector directory, checking that it holds the
detector that was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import Detector, load_detector, read_meta
from unigendet.labels import DetectionResult


def saved_detector_name(directory: str | Path) -> str:
    """The registry name recorded in a saved detector directory (ConfigError when it is not one)."""
    return read_meta(Path(directory))["detector"]


class DetectorAdapter:
    """``score``/``describe`` over a :class:`unigendet.detectors.base.Detector`; ``questions`` are ignored."""

    def __init__(self, detector: Detector, batch_size: int = 32, threshold: float = 0.5):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.detector = detector
        self.batch_size = batch_size
        self.threshold = threshold

    @classmethod
    def load(cls, directory: str | Path, name: str, backbone_path: str | None = None,
             device: str | torch.device | None = None, batch_size: int = 32) -> DetectorAdapter:
        """The detector saved in ``directory`` (``save_pretrained``), which must be a ``name`` detector, on
        ``device``. ConfigError naming both when the directory holds another detector."""
        found = saved_detector_name(directory)
        if found != name:
            raise ConfigError(f"{directory} holds a saved {found!r} detector, not {name!r}")
        detector = load_detector(directory, backbone_path=backbone_path)
        if device is not None:
            detector.to(device)
        return cls(detector, batch_size=batch_size)

    @property
    def model(self):
        return self.detector

    def describe(self) -> dict[str, Any]:
        return {**self.detector.describe(), "batch_size": self.batch_size, "threshold": self.threshold}

    def score(self, images: Sequence[Image.Image], questions: Sequence[str | None] | None = None
              ) -> list[DetectionResult]:
        scores = self.detector.predict_proba(list(images), batch_size=self.batch_size)
        return [DetectionResult(p_fake=float(p), threshold=self.threshold) for p in scores]
