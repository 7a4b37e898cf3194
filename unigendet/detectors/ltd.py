"""LTD, Latent Transition Discrepancy: does an image move smoothly through the middle layers of a frozen CLIP?

Features: the CLS token of the residual stream after each candidate block of a frozen CLIP ViT (default
0-based blocks 11..19 of ViT-L/14, width 1024, no final LayerNorm, no projection) -> f [B, C, D].

Head (trainable, about 12.6 M parameters at ViT-L):

1. *Window selection*: logits over the C - n + 1 windows of n consecutive candidate layers. Training draws a
   hard one-hot per sample by Gumbel-max with a straight-through gradient (forward: the one-hot; backward: the
   gradient of softmax((logits + G) / tau)); evaluation takes argmax(logits), or keeps sampling
   (``eval_selection: sample``, seeded) as the authors' released code does. ``selection: fixed:s`` always
   takes window s (no logits).
2. Two branches over the selected window F_s [B, n, D]: *raw* = [cls_raw; F_s + P_raw], *ltd* =
   [cls_ltd; (F_s[k+1] - F_s[k]) + P_ltd] (adjacent-layer differences), each with a learnable CLS token and
   learnable positions (``pos_enc``), through ONE shared post-norm ``TransformerEncoderLayer`` (GELU, FFN 4D,
   dropout 0.3).
3. The branches' CLS outputs, concatenated -> LayerNorm -> Linear -> logit of "fake"; loss BCE.

Ablations: ``branches`` (raw / ltd / both), ``pos_enc``, ``window_n``, ``candidate_layers``, ``selection``.
The released checkpoint of the authors loads with :mod:`unigendet.detectors.ltd_official`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import Detector, register_detector, revalidate
from unigendet.detectors.clip_backbone import CLIPBackboneConfig, FrozenCLIP
from unigendet.detectors.images import ImagePrepConfig, normalize, prepare_square, to_tensor01

logger = logging.getLogger(__name__)

_FIXED = re.compile(r"^fixed:(\d+)$")


def _ltd_image_defaults() -> ImagePrepConfig:
    # Training: shorter side to 256, random 224 crop, random flip; evaluation: centre crop at native size.
    return ImagePrepConfig(resize=None, train_resize=256, resample="bilinear", train_random_crop=True,
                           train_hflip=True)


@dataclass
class LTDConfig:
    """LTD detector. ``candidate_layers`` are 0-based CLIP block indices (block b's output is hidden state b+1);
    ``official_checkpoint`` optionally names the authors' released ``.pth`` to load at build time."""

    backbone: CLIPBackboneConfig = field(default_factory=CLIPBackboneConfig)
    image: ImagePrepConfig = field(default_factory=_ltd_image_defaults)
    candidate_layers: list[int] = field(default_factory=lambda: list(range(11, 20)))
    window_n: int = 5
    selection: str = "gumbel"
    gumbel_tau: float = 1.0
    eval_selection: Literal["argmax", "sample"] = "argmax"
    eval_seed: int = 0
    branches: Literal["raw", "ltd", "both"] = "both"
    pos_enc: bool = True
    encoder_heads: int = 8
    encoder_ffn: int | None = None
    encoder_dropout: float = 0.3
    init_seed: int = 0
    official_checkpoint: str | None = None

    def validate(self) -> None:
        layers = self.candidate_layers
        if not layers or any(b >= a for a, b in zip(layers[1:], layers[:-1])):
            raise ConfigError(f"candidate_layers must be strictly increasing and non-empty, got {layers}")
        if layers[0] < 0 or layers[-1] >= self.backbone.num_hidden_layers:
            raise ConfigError(f"candidate_layers {layers} outside the backbone's blocks "
                             f"0..{self.backbone.num_hidden_layers - 1}")
        minimum = 2 if self.branches in ("ltd", "both") else 1
        if not minimum <= self.window_n <= len(layers):
            raise ConfigError(f"window_n must be in [{minimum}, {len(layers)}] for branches={self.branches!r}, "
                             f"got {self.window_n}")
        if self.selection != "gumbel":
            match = _FIXED.match(self.selection)
            if match is None:
                raise ConfigError(f"selection must be 'gumbel' or 'fixed:<window index>', got {self.selection!r}")
            if int(match.group(1)) >= self.num_windows:
                raise ConfigError(f"selection {self.selection!r}: only {self.num_windows} windows "
                                 f"(0..{self.num_windows - 1})")
        if self.gumbel_tau <= 0:
            raise ConfigError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if self.backbone.hidden_size % self.encoder_heads:
            raise ConfigError(f"encoder_heads {self.encoder_heads} must divide the backbone width "
                             f"{self.backbone.hidden_size}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

    @property
    def num_windows(self) -> int:
        return len(self.candidate_layers) - self.window_n + 1

    @property
    def fixed_window(self) -> int | None:
        match = _FIXED.match(self.selection)
        return None if match is None else int(match.group(1))


def straight_through_gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """Hard one-hot of argmax(logits + G) in the forward pass, gradient of softmax((logits + G) / tau) backward."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    exponential = (-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20)
    gumbel = -torch.log(exponential)
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def candidate_windows(features: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C, D] -> [B, C - n + 1, n, D]: every run of n consecutive candidate layers."""
    return features.unfold(1, n, 1).permute(0, 1, 3, 2)


def layer_differences(window: torch.Tensor) -> torch.Tensor:
    """[B, n, D] -> [B, n - 1, D]: f[k+1] - f[k]."""
    return window[:, 1:] - window[:, :-1]


@register_detector("ltd")
class LTDDetector(Detector):
    config_class = LTDConfig
    default_lr = 5e-5

    def __init__(self, config: LTDConfig, backbone: FrozenCLIP):
        super().__init__(config)
        self.backbone = backbone
        width = config.backbone.hidden_size
        n = config.window_n
        if config.fixed_window is None:
            self.selector_logits = nn.Parameter(torch.randn(config.num_windows))
        uses_raw = config.branches in ("raw", "both")
        uses_ltd = config.branches in ("ltd", "both")
        self.cls_raw = nn.Parameter(torch.randn(1, 1, width)) if uses_raw else None
        self.cls_ltd = nn.Parameter(torch.randn(1, 1, width)) if uses_ltd else None
        self.pos_raw = nn.Embedding(n, width) if uses_raw and config.pos_enc else None
        self.pos_ltd = nn.Embedding(n - 1, width) if uses_ltd and config.pos_enc else None
        self.encoder = nn.TransformerEncoderLayer(
            d_model=width, nhead=config.encoder_heads, dim_feedforward=config.encoder_ffn or 4 * width,
            dropout=config.encoder_dropout, activation="gelu", batch_first=True)
        summary = width * (int(uses_raw) + int(uses_ltd))
        self.head_norm = nn.LayerNorm(summary)
        self.head = nn.Linear(summary, 1)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, config: LTDConfig) -> LTDDetector:
        backbone = FrozenCLIP.build(config.backbone)
        revalidate(config, config.backbone.path or "the random backbone")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            detector = cls(config, backbone)
        if config.official_checkpoint is not None:
            from unigendet.detectors.ltd_official import load_official_weights

            load_official_weights(detector, config.official_checkpoint)
        return detector

    @classmethod
    def config_for_loading(cls, config: LTDConfig) -> LTDConfig:
        config.official_checkpoint = None
        return config

    # ----------------------------------------------------------------------------------------------- data
    def preprocess(self, images, *, train: bool = False, **extras: Any) -> dict[str, torch.Tensor]:
        if extras:
            raise TypeError(f"LTD takes no per-image extras, got {sorted(extras)}")
        size = self.config.backbone.image_size
        pixels = [to_tensor01(prepare_square(image, size, self.config.image, train=train)) for image in images]
        return {"pixels": torch.stack(pixels)}

    def features_are_deterministic(self, train: bool) -> bool:
        return not (train and self.config.image.random_at_train())

    def feature_settings(self, train: bool) -> dict[str, Any]:
        return {"candidate_layers": self.config.candidate_layers, "image": vars(self.config.image),
                "image_size": self.config.backbone.image_size}

    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """CLS of the candidate blocks' outputs -> [B, C, D] (only the blocks up to the last candidate run)."""
        image = self.config.image
        pixel_values = normalize(batch["pixels"].to(self.device), image.mean, image.std)
        states = self.backbone.hidden_states(pixel_values, upto=self.config.candidate_layers[-1] + 1)
        return torch.stack([states[b + 1][:, 0] for b in self.config.candidate_layers], dim=1)

    # ----------------------------------------------------------------------------------------------- head
    def selection_weights(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """One-hot window choice per sample, [B, C - n + 1] (straight-through in training with Gumbel)."""
        cfg = self.config
        if cfg.fixed_window is not None:
            index = torch.full((batch_size,), cfg.fixed_window, device=device)
            return F.one_hot(index, cfg.num_windows).float()
        logits = self.selector_logits.unsqueeze(0).expand(batch_size, -1)
        if self.training:
            return straight_through_gumbel(logits, cfg.gumbel_tau)
        if cfg.eval_selection == "sample":
            generator = torch.Generator(device=device).manual_seed(cfg.eval_seed)
            return straight_through_gumbel(logits.detach(), cfg.gumbel_tau, generator)
        return F.one_hot(logits.argmax(dim=-1), cfg.num_windows).float()

    def select_window(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_s [B, n, D], selection weights [B, windows])."""
        weights = self.selection_weights(features.shape[0], features.device)
        windows = candidate_windows(features, self.config.window_n)
        return torch.einsum("bc,bcnd->bnd", weights, windows), weights

    def _branch(self, tokens: torch.Tensor, cls_token: nn.Parameter, positions: nn.Embedding | None) -> torch.Tensor:
        if positions is not None:
            tokens = tokens + positions.weight.unsqueeze(0)
        sequence = torch.cat([cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.encoder(sequence)[:, 0]

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        window, _ = self.select_window(features.float())
        summaries = []
        if self.cls_raw is not None:
            summaries.append(self._branch(window, self.cls_raw, self.pos_raw))
        if self.cls_ltd is not None:
            summaries.append(self._branch(layer_differences(window), self.cls_ltd, self.pos_ltd))
        return self.head(self.head_norm(torch.cat(summaries, dim=-1))).squeeze(-1)

    def selected_window(self) -> int:
        """The window evaluation uses with ``eval_selection: argmax`` (index into the candidate windows)."""
        if self.config.fixed_window is not None:
            return self.config.fixed_window
        return int(self.selector_logits.argmax())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "selected_window": self.selected_window()}

