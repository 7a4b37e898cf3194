"""LPIPS perceptual distance (learned per-layer weights on normalised deep features), written here because the
usual packages cannot be installed beside this project's torch.

The ``lpips`` package and torchmetrics' LPIPS both depend on torchvision, which has no build for the CPU torch
wheel this project pins. This module re-implements the metric: a VGG16 or AlexNet convolutional trunk (layer
indices as torchvision numbers them, so ``features.<i>.weight`` keys of a torchvision state dict load as they
are); the input, in [-1, 1], is shifted and scaled per channel; at five ReLU taps each feature vector is divided
by its channel norm; the squared difference of the two images' normalised features is weighted per channel by a
non-negative 1x1 linear layer, averaged over space and summed over the taps. ``distance_map`` keeps the spatial
map (upsampled to the input size) before the average.

Weights: the trunk from a torchvision-layout file (``trunk_path``; ``vgg16-*.pth`` / ``alexnet-*.pth``, or a
safetensors file with the same keys) and the linear heads from the official LPIPS file (``linear_path``;
``vgg.pth`` / ``alex.pth`` of the ``lpips`` package, keys ``lin<i>.model.1.weight`` of shape ``[1, C, 1, 1]``).
Without files the weights are random (seeded), e.g. the tiny trunk of the tests (``width_divisor``: every
channel count divided by it). When the ``lpips`` package is importable and ``backend`` is ``auto`` or
``package``, it is used instead (for ``vgg`` / ``alex`` with package-shipped heads).

The metric is frozen: parameters never require gradients, but gradients flow to both inputs.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from unigendet.config.loader import ConfigError

logger = logging.getLogger(__name__)

# Per-channel shift and scale applied to [-1, 1] inputs before the trunk (the values LPIPS was trained with).
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# torchvision's VGG16 ``features``: conv widths with "M" for max-pooling; LPIPS taps the ReLU after the
# second/second/third/third/third conv of each block (torchvision indices 3, 8, 15, 22, 29).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)
# torchvision's AlexNet ``features`` (out channels, kernel, stride, padding) with pools after conv 1 and 2;
# LPIPS taps the ReLU after each conv (indices 1, 4, 7, 9, 11).
_ALEX = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
_ALEX_TAPS = (1, 4, 7, 9, 11)


@dataclass
class LPIPSConfig:
    """The LPIPS metric: ``net`` trunk, ``width_divisor`` (1 = the real trunk; larger = a narrow random trunk for
    tests), ``trunk_path`` / ``linear_path`` (local weight files; null = random, seeded by ``init_seed``) and
    ``backend`` (``builtin``: this module; ``package``: the ``lpips`` package, an error when not importable;
    ``auto``: the package when importable and no local file is named, else this module)."""

    net: Literal["vgg", "alex"] = "vgg"
    width_divisor: int = 1
    trunk_path: str | None = None
    linear_path: str | None = None
    backend: Literal["auto", "builtin", "package"] = "auto"
    init_seed: int = 0

    def validate(self) -> None:
        if self.width_divisor < 1:
            raise ConfigError(f"width_divisor must be >= 1, got {self.width_divisor}")
        if self.width_divisor != 1 and (self.trunk_path or self.linear_path):
            raise ConfigError("trunk_path/linear_path hold full-width weights; they need width_divisor 1")
        if self.backend == "package" and self.width_divisor != 1:
            raise ConfigError("backend 'package' has full-width trunks only (width_divisor must be 1)")

    def input_problems(self, prefix: str) -> list[str]:
        return [f"{prefix}.{name}: no such file: {getattr(self, name)}" for name in ("trunk_path", "linear_path")
                if getattr(self, name) is not None and not Path(getattr(self, name)).is_file()]


def _vgg_layers(divisor: int) -> tuple[list[nn.Module], list[int]]:
    layers: list[nn.Module] = []
    channels, widths = 3, []
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        width = max(1, item // divisor)
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=False)]
        channels = width
    for tap in _VGG16_TAPS:
        widths.append(layers[tap - 1].out_channels)
    return layers, widths


def _alex_layers(divisor: int) -> tuple[list[nn.Module], list[int]]:
    layers: list[nn.Module] = []
    channels = 3
    for item in _ALEX:
        if item == "M":
            layers.append(nn.MaxPool2d(3, 2))
            continue
        width, kernel, stride, padding = item
        width = max(1, width // divisor)
        layers += [nn.Conv2d(channels, width, kernel, stride, padding), nn.ReLU(inplace=False)]
        channels = width
    return layers, [layers[tap - 1].out_channels for tap in _ALEX_TAPS]


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``module``; ConfigError naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError(f"{where}: missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    module.load_state_dict(state)


class LPIPS(nn.Module):
    """``forward(x, y) -> [B]`` LPIPS distance of images in [-1, 1] (see the module docstring)."""

    def __init__(self, config: LPIPSConfig):
        super().__init__()
        config.validate()
        self.config = config
        layers, widths = (_vgg_layers if config.net == "vgg" else _alex_layers)(config.width_divisor)
        self.features = nn.Sequential(*layers)
        self.taps = _VGG16_TAPS if config.net == "vgg" else _ALEX_TAPS
        self.lin = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(INPUT_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def build(cls, config: LPIPSConfig) -> nn.Module:
        """This module (random or from local files), or the ``lpips`` package's (see ``LPIPSConfig.backend``).
        ``config.backend`` is set to the one used, so a saved model records which weights layout it holds."""
        if _use_package(config):
            config.backend = "package"
            return PackageLPIPS(config)
        config.backend = "builtin"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            metric = cls(config)
        if config.trunk_path is not None:
            metric.load_trunk(_read_weights(config.trunk_path), config.trunk_path)
        if config.linear_path is not None:
            metric.load_linear(_read_weights(config.linear_path), config.linear_path)
        return metric

    def train(self, mode: bool = True) -> LPIPS:
        # Always evaluation mode: the metric is fixed.
        return super().train(False)

    def load_trunk(self, state: dict[str, torch.Tensor], where: str = "trunk weights") -> None:
        """torchvision layout: ``features.<i>.weight/bias`` (a classifier part, if present, is ignored)."""
        trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not trunk:
            raise ConfigError(f"{where}: no 'features.*' keys (torchvision VGG16/AlexNet layout expected)")
        _load_exact(self.features, trunk, where)

    def load_linear(self, state: dict[str, torch.Tensor], where: str = "linear weights") -> None:
        """Official LPIPS layout: ``lin<i>.model.1.weight`` [1, C, 1, 1] for the five taps."""
        mapped = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if not (head.startswith("lin") and head[3:].isdigit() and rest == "model.1.weight"):
                raise ConfigError(f"{where}: unexpected key {key!r} (expected lin<i>.model.1.weight)")
            mapped[f"{head[3:]}.weight"] = value
        _load_exact(self.lin, mapped, where)

    def tap_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.taps:
                out.append(h)
                if len(out) == len(self.taps):
                    break
        return out

    def distance_map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W]: the per-tap weighted squared differences, each upsampled to the input size, summed."""
        total = 0.0
        for fx, fy, lin in zip(self.tap_features(x), self.tap_features(y), self.lin):
            diff = (_unit(fx) - _unit(fy)) ** 2
            layer = lin(diff)
            total = total + nn.functional.interpolate(layer, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fx, fy, lin in zip(self.tap_features(x), self.tap_features(y), self.lin):
            total = total + lin((_unit(fx) - _unit(fy)) ** 2).mean(dim=(1, 2, 3))
        return total


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Each spatial position's feature vector divided by its norm over channels."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


def _use_package(config: LPIPSConfig) -> bool:
    available = importlib.util.find_spec("lpips") is not None
    if config.backend == "package" and not available:
        raise ConfigError("lpips.backend: 'package' but the lpips package is not importable")
    return (config.backend == "package"
            or (config.backend == "auto" and available and config.width_divisor == 1
                and config.trunk_path is None and config.linear_path is None))


class PackageLPIPS(nn.Module):
    """The ``lpips`` package's metric behind the same ``forward(x, y) -> [B]`` (frozen)."""

    def __init__(self, config: LPIPSConfig):
        super().__init__()
        import lpips

        self.metric = lpips.LPIPS(net=config.net, verbose=False)
        self.requires_grad_(False)
        self.eval()
        logger.info("LPIPS from the lpips package (net %s)", config.net)

    def train(self, mode: bool = True) -> PackageLPIPS:
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.metric(x, y).flatten()
