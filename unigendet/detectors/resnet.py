"""A ResNet binary classifier: the cheap first stage of a detection cascade, or a baseline on its own.

Built on transformers' ``ResNetModel`` (ImageNet weights from a local directory in the ``microsoft/resnet-50``
layout, or seeded random weights at any size). The network is cut in two at a stage boundary:

* the *feature* part, frozen: the stem and the first ``4 - trainable_stages`` stages, whose output map
  [B, C, h, w] is what :meth:`ResNetDetector.extract_features` returns (and what a feature cache stores);
* the *head*, trained with BCE: the last ``trainable_stages`` stages (initialised from the same weights, so
  ``trainable_stages: 1`` fine-tunes ``layer4`` of a ResNet-50), global average pooling, dropout and a linear
  layer to one logit of "fake". ``trainable_stages: 0`` is a linear probe on the pooled features.

BatchNorm layers of the head keep their ImageNet running statistics while fine-tuning (``freeze_batchnorm``,
default), because the small batches of detector training would give noisy estimates.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import Detector, register_detector
from unigendet.detectors.clip_backbone import load_hf_strict, state_fingerprint
from unigendet.detectors.images import ImagePrepConfig, normalize, prepare_square, to_tensor01

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_STAGES = 4

# Geometry fields of ResNetBackboneConfig that mirror transformers' ResNetConfig.
_GEOMETRY = ("embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act", "downsample_in_first_stage",
             "downsample_in_bottleneck")


@dataclass
class ResNetBackboneConfig:
    """Where the ResNet comes from and its geometry.

    ``path``: a local Hugging Face directory (``config.json`` + weights, e.g. ``microsoft/resnet-50``, whose
    classification head is ignored); its config then overwrites the geometry below, so a saved detector records
    what it ran. ``path: null``: random weights drawn with ``init_seed`` (defaults: ResNet-50).
    """

    path: str | None = None
    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    layer_type: Literal["bottleneck", "basic"] = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    init_seed: int = 0

    def validate(self) -> None:
        if len(self.hidden_sizes) != NUM_STAGES or len(self.depths) != NUM_STAGES:
            raise ConfigError(f"hidden_sizes and depths need {NUM_STAGES} entries (one per stage), got "
                              f"{self.hidden_sizes} and {self.depths}")
        if min(self.depths) < 1 or min(self.hidden_sizes) < 1 or self.embedding_size < 1:
            raise ConfigError("depths, hidden_sizes and embedding_size must be positive")

    def resnet_config(self):
        from transformers import ResNetConfig

        return ResNetConfig(**{name: getattr(self, name) for name in _GEOMETRY})

    def adopt_geometry(self, resnet_config) -> None:
        for name in _GEOMETRY:
            setattr(self, name, getattr(resnet_config, name))


def _resnet_image_defaults() -> ImagePrepConfig:
    # ImageNet evaluation: shorter side 256, centre 224 crop; training adds a random crop and a flip.
    return ImagePrepConfig(resize=256, train_resize=256, resample="bilinear", train_random_crop=True,
                           train_hflip=True, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


@dataclass
class ResNetDetectorConfig:
    """ResNet binary classifier: ``crop`` pixels in, the last ``trainable_stages`` stages plus a linear layer
    trained (0: linear probe on frozen pooled features)."""

    backbone: ResNetBackboneConfig = field(default_factory=ResNetBackboneConfig)
    image: ImagePrepConfig = field(default_factory=_resnet_image_defaults)
    crop: int = 224
    trainable_stages: int = 1
    freeze_batchnorm: bool = True
    dropout: float = 0.0
    init_seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.trainable_stages < NUM_STAGES:
            raise ConfigError(f"trainable_stages must be in [0, {NUM_STAGES - 1}], got {self.trainable_stages}")
        if self.crop < 8:
            raise ConfigError(f"crop must be >= 8 pixels, got {self.crop}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class FrozenResNetTrunk(nn.Module):
    """The frozen stem and first stages of a ``ResNetModel``, with the fingerprint the detector contract uses."""

    def __init__(self, embedder: nn.Module, stages: nn.ModuleList):
        super().__init__()
        self.embedder = embedder
        self.stages = stages
        self.requires_grad_(False)
        self.train(False)
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> FrozenResNetTrunk:
        """Always eval: frozen BatchNorm statistics must never update."""
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.embedder(pixels)
        for stage in self.stages:
            hidden = stage(hidden)
        return hidden

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.state_dict())
        return self._fingerprint

    def forget_fingerprint(self) -> None:
        self._fingerprint = None


def load_resnet(config: ResNetBackboneConfig):
    """A transformers ``ResNetModel`` from ``config.path`` (geometry adopted into ``config``) or random weights."""
    from transformers import ResNetModel

    if config.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            return ResNetModel(config.resnet_config())
    model = load_hf_strict(ResNetModel, config.path, "ResNet",
                           "the microsoft/resnet-50 layout (config.json + model.safetensors)")
    config.adopt_geometry(model.config)
    return model


@register_detector("resnet")
class ResNetDetector(Detector):
    config_class = ResNetDetectorConfig
    default_lr = 1e-4

    def __init__(self, config: ResNetDetectorConfig, resnet: nn.Module):
        super().__init__(config)
        cut = NUM_STAGES - config.trainable_stages
        stages = resnet.encoder.stages
        self.backbone = FrozenResNetTrunk(resnet.embedder, nn.ModuleList(list(stages)[:cut]))
        # The trainable stages start from the loaded weights; deep copies keep them independent of the trunk.
        self.head_stages = nn.ModuleList(copy.deepcopy(stage) for stage in list(stages)[cut:])
        width = config.backbone.hidden_sizes[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, 1))

    @classmethod
    def build(cls, config: ResNetDetectorConfig) -> ResNetDetector:
        return cls(config, load_resnet(config.backbone))

    def train(self, mode: bool = True) -> ResNetDetector:
        super().train(mode)
        if mode and self.config.freeze_batchnorm:
            for module in self.head_stages.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------------------- contract
    def preprocess(self, images: Sequence[Image.Image], *, train: bool = False,
                   **extras: Any) -> dict[str, torch.Tensor]:
        if extras:
            raise TypeError(f"the resnet detector takes no per-image extras, got {sorted(extras)}")
        crops = [to_tensor01(prepare_square(image, self.config.crop, self.config.image, train=train))
                 for image in images]
        size = self.config.crop
        return {"pixels": torch.stack(crops) if crops else torch.zeros(0, 3, size, size)}

    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = batch["pixels"].to(self.device, torch.float32)
        return self.backbone(normalize(pixels, self.config.image.mean, self.config.image.std))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features
        for stage in self.head_stages:
            hidden = stage(hidden)
        pooled = hidden.mean(dim=(2, 3))
        return self.classifier(pooled).squeeze(-1)

    def feature_settings(self, train: bool) -> dict[str, Any]:
        image = self.config.image
        return {"crop": self.config.crop, "trainable_stages": self.config.trainable_stages,
                "resize": image.train_resize if train else image.resize, "resample": image.resample,
                "mean": image.mean, "std": image.std,
                "random": train and image.random_at_train()}

    def features_are_deterministic(self, train: bool) -> bool:
        return not (train and self.config.image.random_at_train())
