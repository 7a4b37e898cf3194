"""The objective of the ``detector`` training stage: a baseline detector (LTD, CoRIT, spectral, ResNet, ...)
learns p(fake).

The model is the detector itself (:mod:`unigendet.detectors`), wrapped so that the DeepSpeed engine's forward
returns the detector's own loss (binary cross-entropy, labels 1 = fake). Only the detector's trainable part
(its head) reaches the optimiser; the frozen feature part (a CLIP encoder, a Fourier transform) never does.
A batch of labelled images becomes tensors through the detector's own preparation (``collate``), or, with
``cache_dir``, through the on-disk cache of its frozen features (:mod:`unigendet.detectors.feature_cache`),
so that epochs after the first run only the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unigendet.config.loader import ConfigError, to_dict
from unigendet.config.ranges import require_non_negative
from unigendet.data.image_folders import ImageFolderBatch, ImageFolderLoader
from unigendet.detectors.base import Detector, build_detector, detector_class, detector_config
from unigendet.detectors.feature_cache import FeatureCache, cached_features

logger = logging.getLogger(__name__)


@dataclass
class DetectorStageConfig:
    """Which detector trains and how its inputs are produced.

    ``name``: a registered detector (``ltd``, ``corit``, ``spectral``, ``resnet``, ...); ``config``: that detector's
    own config (validated by its config class; a ``_base_`` include such as ``../detectors/ltd_tiny.yaml`` works
    here, and the saved run config records every resolved key). ``cache_dir``: keep the frozen features of every
    training image on disk (only for detectors whose training-time features are a pure function of the image: no
    random crops or flips). ``statistics_images``: images of the training split from which data-dependent statistics
    (the spectral detector's feature standardisation, its reference distribution) are fitted once at start-up."""

    name: str = "ltd"
    config: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    statistics_images: int = 512

    def validate(self) -> None:
        try:
            detector_class(self.name)
        except ConfigError as err:
            raise ConfigError(f"name: {err}") from err
        try:
            detector_config(self.name, self.config)
        except ConfigError as err:
            raise ConfigError(f"config: {err}") from err
        require_non_negative("statistics_images", self.statistics_images)

    def resolve(self) -> None:
        """Replace ``config`` by the detector's complete config (every key with its value), so the run's saved
        config records them all; done by the run that trains this detector, not by runs that ignore the section."""
        self.config = to_dict(detector_config(self.name, self.config))

    def detector_config(self) -> Any:
        """The detector's config dataclass."""
        return detector_config(self.name, self.config)

    @property
    def sharpness_radius(self) -> float:
        """SAM's radius rho for detectors trained with SAM (``sam_rho`` in their config), else 0."""
        return float(self.config.get("sam_rho", 0.0) or 0.0)

    def input_problems(self, prefix: str) -> list[str]:
        """Weights the detector reads at build time that do not exist (one message per key)."""
        problems = []
        backbone = self.config.get("backbone")
        path = backbone.get("path") if isinstance(backbone, dict) else None
        if path is not None and not Path(path).is_dir():
            problems.append(f"{prefix}.config.backbone.path: no such directory: {path}")
        official = self.config.get("official_checkpoint")
        if official is not None and not Path(official).is_file():
            problems.append(f"{prefix}.config.official_checkpoint: no such file: {official}")
        pipeline = self.config.get("pipeline")
        path = pipeline.get("path") if isinstance(pipeline, dict) else None
        if path is not None and not Path(path).is_dir():
            problems.append(f"{prefix}.config.pipeline.path: no such directory: {path}")
        lpips = self.config.get("lpips")
        for key in ("trunk_path", "linear_path"):
            file = lpips.get(key) if isinstance(lpips, dict) else None
            if file is not None and not Path(file).is_file():
                problems.append(f"{prefix}.config.lpips.{key}: no such file: {file}")
        return problems


class DetectorModel(nn.Module):
    """What the engine wraps: ``forward(tensors)`` is the detector's loss dict (``loss``, ``logits``, ``accuracy``)."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.detector.loss(tensors)

    def optimizer_param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        """The detector's own parameter groups (per-module learning rates), or None for the engine's default."""
        return self.detector.param_groups(weight_decay)


@dataclass
class DetectorBatch:
    """A detector's training tensors; ``sequence_length`` is its number of images (what the trainer counts per
    step, where a packed batch counts tokens)."""

    tensors: dict[str, torch.Tensor]
    sequence_length: int

    def to(self, device: torch.device) -> DetectorBatch:
        return DetectorBatch({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.tensors.items()},
                             self.sequence_length)


class DetectorObjective:
    """Labelled images -> the detector's tensors (``prepare``) -> its loss through the engine (``__call__``)."""

    t2i_hooks: tuple = ()

    def __init__(self, cfg: DetectorStageConfig, detector: Detector):
        self.cfg = cfg
        self.detector = detector
        self.model = DetectorModel(detector)
        self.cache: FeatureCache | None = None
        if cfg.cache_dir is not None:
            if not detector.features_are_deterministic(train=True):
                raise ConfigError(f"detector.cache_dir: {detector.name}'s training-time features are not a pure "
                                  "function of the image (random crops or flips; for CRAFT, terminal_mode 'shared', "
                                  "whose inversion uses weights that train), so they cannot be cached; set "
                                  "detector.config.image.train_random_crop=false and detector.config.image."
                                  "train_hflip=false (CRAFT: detector.config.terminal_mode=two_copy), or remove "
                                  "detector.cache_dir")
            self.cache = FeatureCache.for_detector(detector, cfg.cache_dir, train=True)

    @classmethod
    def build(cls, cfg: DetectorStageConfig) -> DetectorObjective:
        return cls(cfg, build_detector(cfg.name, cfg.detector_config()))

    @property
    def trainable(self) -> bool:
        return bool(self.detector.trainable_parameters())

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Detectors train in float32 (their heads are small; the spectral map must stay float32)."""
        self.detector.to(device)

    def fit_statistics(self, data: ImageFolderLoader) -> None:
        """Fit the detector's data-dependent statistics on ``statistics_images`` training images (the same images
        on every rank), for detectors that have any."""
        if type(self.detector).fit_statistics is Detector.fit_statistics or not self.cfg.statistics_images:
            return
        images, labels = data.sample(self.cfg.statistics_images)
        self.detector.fit_statistics(images, labels)
        logger.info("%s: statistics fitted on %d training images (%d real)", self.detector.name, len(images),
                    labels.count(0))

    def prepare(self, batch: ImageFolderBatch) -> DetectorBatch:
        """The detector's training tensors of ``batch`` (its frozen features from the cache when one is used)."""
        if self.cache is None:
            tensors = self.detector.collate(batch.images, batch.labels, train=True, **batch.extras)
        else:
            features = cached_features(self.detector, batch.images, self.cache, train=True, **batch.extras)
            tensors = {"features": features, "labels": torch.as_tensor(batch.labels, dtype=torch.float32)}
            if not self.detector.features_replace_inputs:
                tensors.update(self.detector.preprocess(batch.images, train=True, **batch.extras))
        return DetectorBatch(tensors, len(batch))

    def __call__(self, model, batch: DetectorBatch, generator: torch.Generator | None = None,
                 reduce_counts=None, world_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch.tensors)
        return out["loss"], {"loss": out["loss"].detach(), "accuracy": out["accuracy"].detach()}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.log_summary()
