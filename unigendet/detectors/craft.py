"""CRAFT: contrastive reconstruction through a Stable Diffusion image-variation model, scored by its error.

Forward, per image x in [-1, 1] at ``resolution`` (components and DDIM maths in
:mod:`unigendet.detectors.craft_pipeline`):

1. ``z_0 = scaling * VAE.encode(x).mean`` (the VAE encoder is always frozen);
2. DDIM inversion, guidance 1, with the frozen UNet conditioned on the frozen CLIP image embedding of x, for
   ``num_steps`` (T) steps -> ``z = x_T`` (no gradients);
3. class-guided perturbation away from the running real-class centre ``mu_real`` (a buffer saved with the model;
   a running mean, momentum ``mu_momentum``, of the unperturbed z of *real* training images only; before the
   first real image is seen nothing is perturbed): ``z' = z + lambda (z - mu) / (||z - mu|| + eps)``, then
   rescaled to ``||z'|| <= tau``; lambda = ``perturb_step`` or kappa * sqrt(dim z), tau = ``norm_bound`` or
   (1 + kappa) * sqrt(dim z);
4. reverse DDIM for T steps: the first T - k with the frozen UNet/encoder and no gradients, the last k with the
   trainable copies and gradients (each of these UNet calls gradient-checkpointed; ``unet_autocast: bfloat16``
   runs every UNet call under bf16 autocast, the latents staying fp32). ``terminal_mode: two_copy``
   keeps separate frozen and trainable copies (the inversion then depends on frozen weights only, so its result
   can be cached on disk per image: the detector's "features"); ``shared`` uses one set of weights everywhere
   (truncated backpropagation through the last k steps; nothing can be cached);
5. ``x_hat = VAE.decode(x_T-k..0 / scaling)`` with the trainable decoder;
6. d = spatially averaged LPIPS(x, x_hat) (``distance: mse``: the mean squared error);
7. a small MLP on d, standardised by running statistics, gives two logits; p(fake) = softmax[1]. ``forward``
   returns the logit difference, so sigmoid(forward) = p(fake) as for every detector.

Loss: L = L_rec + ``lambda_cls`` * CE. ``recon_loss: cr`` (contrastive reconstruction): d for a real image and
max(0, m - d) + gamma * max(0, d - (m + delta)) for a fake one; ``l1`` / ``l2``: the mean absolute / squared pixel
error of every image (plain reconstruction fine-tuning, labels unused). ``finetune`` chooses the trainable
modules among ``encoder`` (CLIP conditioning encoder), ``unet`` and ``decoder``; the MLP always trains. Each
module has its own learning rate (``param_groups``).

Cost per image: test time T inversion + T reconstruction UNet calls; training the same, or only T reconstruction
calls when the inverted latent comes from the cache (``two_copy``), of which k run with gradients (plus their
recomputation in the backward pass under checkpointing).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from unigendet.config.loader import ConfigError, to_dict
from unigendet.detectors.base import Detector, register_detector
from unigendet.detectors.clip_backbone import state_fingerprint
from unigendet.detectors.craft_pipeline import (
    CraftPipelineConfig,
    DDIMPath,
    build_components,
    ddim_move,
    perturb_latent,
)
from unigendet.detectors.images import ImagePrepConfig, prepare_square, to_tensor01
from unigendet.detectors.lpips import LPIPS, LPIPSConfig

logger = logging.getLogger(__name__)

FINETUNABLE = ("encoder", "unet", "decoder")


@dataclass
class CraftConfig:
    """CRAFT detector (see the module docstring). Learning rates are absolute (the engine's ``optim.lr`` is not
    used for CRAFT's groups); ``gamma`` and the perturbation sizes are interpretations where the method leaves
    them open."""

    pipeline: CraftPipelineConfig = field(default_factory=CraftPipelineConfig)
    resolution: int = 256
    resample: Literal["nearest", "bilinear", "bicubic"] = "bicubic"
    num_steps: int = 50
    k: int = 15
    terminal_mode: Literal["two_copy", "shared"] = "two_copy"
    finetune: list[str] = field(default_factory=lambda: list(FINETUNABLE))
    perturb: bool = True
    kappa: float = 0.1
    perturb_step: float | None = None
    norm_bound: float | None = None
    perturb_eps: float = 1e-6
    mu_momentum: float = 0.99
    distance: Literal["lpips", "mse"] = "lpips"
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    recon_loss: Literal["cr", "l1", "l2"] = "cr"
    margin: float = 0.4
    delta: float = 0.3
    gamma: float = 1.0
    lambda_cls: float = 1.0
    classifier_hidden: int = 16
    distance_momentum: float = 0.99
    lr_encoder: float = 5e-6
    lr_unet: float = 5e-6
    lr_decoder: float = 1e-5
    lr_classifier: float = 1e-4
    gradient_checkpointing: bool = True
    unet_autocast: Literal["none", "bfloat16"] = "none"
    init_seed: int = 0

    def validate(self) -> None:
        if self.resolution < 8:
            raise ConfigError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 <= self.k <= self.num_steps:
            raise ConfigError(f"k must be in [0, num_steps={self.num_steps}], got {self.k}")
        unknown = sorted(set(self.finetune) - set(FINETUNABLE))
        if unknown or len(set(self.finetune)) != len(self.finetune):
            raise ConfigError(f"finetune must be distinct names among {list(FINETUNABLE)}, got {self.finetune}")
        for name in ("kappa", "perturb_eps", "margin", "delta", "gamma", "lambda_cls"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("perturb_step", "norm_bound"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0 or null, got {value}")
        for name in ("mu_momentum", "distance_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("lr_encoder", "lr_unet", "lr_decoder", "lr_classifier"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.classifier_hidden < 1:
            raise ConfigError(f"classifier_hidden must be >= 1, got {self.classifier_hidden}")
        if self.recon_loss != "cr" and self.lambda_cls == 0 and not self.finetune:
            raise ConfigError("nothing would train: recon_loss without finetune modules and lambda_cls 0")

    def image_prep(self) -> ImagePrepConfig:
        return ImagePrepConfig(resize=self.resolution, train_resize=self.resolution, resample=self.resample)


# ---------------------------------------------------------------------------------------------- losses
def contrastive_reconstruction_loss(d: torch.Tensor, labels: torch.Tensor, margin: float, delta: float,
                                    gamma: float) -> torch.Tensor:
    """Per-sample L_CR: d for real (label 0); max(0, m - d) + gamma * max(0, d - (m + delta)) for fake (1)."""
    fake = F.relu(margin - d) + gamma * F.relu(d - (margin + delta))
    return torch.where(labels > 0.5, fake, d)


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the data-parallel ranks (itself on one process), so running statistics stay the same
    on every rank. Every rank calls this in the same training step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


class DistanceClassifier(nn.Module):
    """MLP 1 -> hidden -> 2 on the distance standardised by running statistics (updated in training mode)."""

    def __init__(self, hidden: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.register_buffer("d_mean", torch.zeros(()))
        self.register_buffer("d_var", torch.ones(()))
        self.register_buffer("d_count", torch.zeros(()))

    @torch.no_grad()
    def update_statistics(self, d: torch.Tensor) -> None:
        """Running mean and variance of d over the batch (over every rank's batch when training distributed)."""
        moments = global_sum(torch.stack([d.sum(), d.pow(2).sum(), torch.tensor(float(d.numel()), device=d.device)]))
        count = moments[2].clamp_min(1.0)
        mean = moments[0] / count
        var = (moments[1] / count - mean ** 2).clamp_min(0.0)
        if self.d_count == 0:
            self.d_mean.copy_(mean)
            self.d_var.copy_(var.clamp_min(1e-12))
        else:
            self.d_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
            self.d_var.mul_(self.momentum).add_((1 - self.momentum) * var)
        self.d_count.add_(moments[2])

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_statistics(d.detach())
        standard = (d - self.d_mean) / (self.d_var.sqrt() + 1e-6)
        return self.net(standard.unsqueeze(-1))


class UNetCalls:
    """How many UNet evaluations ran, with and without gradients (for tests and the cost figures)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.with_grad = 0
        self.without_grad = 0

    @property
    def total(self) -> int:
        return self.with_grad + self.without_grad


def _check_resolution(resolution: int, components) -> None:
    """The VAE must map ``resolution`` to a whole latent grid that the UNet can halve at each of its levels."""
    vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(components.unet.config.down_block_types) - 1)
    if resolution % (vae_factor * unet_factor):
        raise ConfigError(f"resolution {resolution} must be a multiple of {vae_factor * unet_factor} (VAE "
                          f"down-sampling {vae_factor} x UNet down-sampling {unet_factor})")


# ---------------------------------------------------------------------------------------------- detector
@register_detector("craft")
class CraftDetector(Detector):
    config_class = CraftConfig
    default_lr = 1e-4
    features_replace_inputs = False  # the cached latent comes with the pixels it is compared against

    def __init__(self, config: CraftConfig, components):
        super().__init__(config)
        finetune = set(config.finetune)
        self.vae = components.vae
        self.scaling = float(self.vae.config.scaling_factor)
        self.scheduler = components.scheduler
        self.path = DDIMPath(self.scheduler, config.num_steps)
        pre = components.preprocess
        self.clip_size = int(pre["size"])
        self.register_buffer("clip_mean", torch.tensor(pre["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(pre["image_std"]).view(1, 3, 1, 1), persistent=False)
        if config.terminal_mode == "two_copy":
            self.frozen = nn.ModuleDict({"unet": components.unet, "image_encoder": components.image_encoder})
            self.frozen.requires_grad_(False)
            tuned = {}
            if "unet" in finetune:
                tuned["unet"] = copy.deepcopy(components.unet).requires_grad_(True)
            if "encoder" in finetune:
                tuned["image_encoder"] = copy.deepcopy(components.image_encoder).requires_grad_(True)
            self.tuned = nn.ModuleDict(tuned)
        else:
            self.frozen = None
            self.tuned = nn.ModuleDict({"unet": components.unet, "image_encoder": components.image_encoder})
            self.tuned["unet"].requires_grad_("unet" in finetune)
            self.tuned["image_encoder"].requires_grad_("encoder" in finetune)
        self.vae.requires_grad_(False)
        if "decoder" in finetune:
            self.vae.decoder.requires_grad_(True)
            self.vae.post_quant_conv.requires_grad_(True)
        self.lpips = LPIPS.build(config.lpips) if config.distance == "lpips" else None
        self.classifier = DistanceClassifier(config.classifier_hidden, config.distance_momentum)
        latent_hw = config.resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))
        latent_shape = (int(self.vae.config.latent_channels), latent_hw, latent_hw)
        self.register_buffer("mu_real", torch.zeros(latent_shape))
        self.register_buffer("mu_real_count", torch.zeros(()))
        self.unet_calls = UNetCalls()
        self._frozen_fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, config: CraftConfig) -> CraftDetector:
        config.pipeline.validate()
        components = build_components(config.pipeline)
        _check_resolution(config.resolution, components)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            return cls(config, components)

    @classmethod
    def config_for_loading(cls, config: CraftConfig) -> CraftConfig:
        """The saved weights replace the pipeline directory and the LPIPS files (their geometry is recorded)."""
        config.pipeline.path = None
        config.lpips.trunk_path = None
        config.lpips.linear_path = None
        return config

    def train(self, mode: bool = True) -> CraftDetector:
        super().train(mode)
        if self.frozen is not None:
            self.frozen.train(False)
        self.vae.encoder.train(False)
        return self

    # ----------------------------------------------------------------------------------------------- pieces
    @property
    def latent_dim(self) -> int:
        return int(self.mu_real.numel())

    @property
    def step_size(self) -> float:
        cfg = self.config
        return cfg.perturb_step if cfg.perturb_step is not None else cfg.kappa * self.latent_dim ** 0.5

    @property
    def bound(self) -> float:
        cfg = self.config
        return cfg.norm_bound if cfg.norm_bound is not None else (1 + cfg.kappa) * self.latent_dim ** 0.5

    def frozen_module(self, name: str) -> nn.Module:
        """The module the inversion and the first T - k reverse steps use."""
        return self.frozen[name] if self.frozen is not None else self.tuned[name]

    def tuned_module(self, name: str) -> nn.Module:
        """The module of the last k reverse steps (the frozen copy where ``name`` is not fine-tuned)."""
        return self.tuned[name] if name in self.tuned else self.frozen[name]

    def conditioning(self, x: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        """CLIP image embedding of x (in [-1, 1]) as a one-token sequence [B, 1, P]."""
        pixels = F.interpolate((x + 1) / 2, size=(self.clip_size, self.clip_size), mode="bicubic",
                               align_corners=False, antialias=True)
        pixels = (pixels - self.clip_mean) / self.clip_std
        return encoder(pixel_values=pixels).image_embeds.unsqueeze(1)

    def unet_eps(self, unet: nn.Module, x: torch.Tensor, step: int, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction at inference step ``step`` (1-based); checkpointed when it records grads."""
        t = self.path.timesteps[step - 1].to(x.device)
        autocast = self.config.unet_autocast != "none"

        def call(latent: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            with torch.autocast(latent.device.type, dtype=torch.bfloat16, enabled=autocast):
                return unet(latent, t, encoder_hidden_states=c).sample.float()

        if torch.is_grad_enabled():
            self.unet_calls.with_grad += 1
            if self.config.gradient_checkpointing and self.training:
                return checkpoint(call, x, cond, use_reentrant=False)
        else:
            self.unet_calls.without_grad += 1
        return call(x, cond)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.vae.encode(x).latent_dist.mean

    @torch.no_grad()
    def invert(self, z0: torch.Tensor, cond: torch.Tensor, unet: nn.Module | None = None) -> torch.Tensor:
        """DDIM inversion z_0 -> z_T (guidance 1, no gradients)."""
        unet = unet if unet is not None else self.frozen_module("unet")
        alphas = self.path.alphas
        x = z0
        for i in range(1, self.path.num_steps + 1):
            x = ddim_move(x, self.unet_eps(unet, x, i, cond), float(alphas[i - 1]), float(alphas[i]))
        return x

    def reconstruct_latent(self, z: torch.Tensor, frozen_cond: torch.Tensor, tuned_cond: torch.Tensor
                           ) -> torch.Tensor:
        """Reverse DDIM z_T -> z_0: steps T..k+1 frozen and without gradients, steps k..1 with the tuned modules."""
        alphas, k = self.path.alphas, self.config.k
        x = z
        with torch.no_grad():
            unet = self.frozen_module("unet")
            for i in range(self.path.num_steps, k, -1):
                x = ddim_move(x, self.unet_eps(unet, x, i, frozen_cond), float(alphas[i]), float(alphas[i - 1]))
        unet = self.tuned_module("unet")
        for i in range(k, 0, -1):
            x = ddim_move(x, self.unet_eps(unet, x, i, tuned_cond), float(alphas[i]), float(alphas[i - 1]))
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scaling).sample

    def distance(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if self.lpips is None:
            return (x - x_hat).pow(2).mean(dim=(1, 2, 3))
        return self.lpips(x, x_hat.float())

    # ----------------------------------------------------------------------------------------------- centre
    @torch.no_grad()
    def update_real_centre(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Running mean of the unperturbed inverted latents of the real samples (label 0) only (over every rank's
        batch when training distributed)."""
        real = z[labels.to(z.device) < 0.5].detach().float()
        total = global_sum(torch.cat([real.sum(0).flatten(), torch.tensor([float(len(real))], device=z.device)]))
        count = float(total[-1])
        if count == 0:
            return
        mean = (total[:-1] / count).view_as(self.mu_real)
        if self.mu_real_count == 0:
            self.mu_real.copy_(mean)
        else:
            m = self.config.mu_momentum
            self.mu_real.mul_(m).add_((1 - m) * mean)
        self.mu_real_count.add_(count)

    def perturb(self, z: torch.Tensor) -> torch.Tensor:
        if not self.config.perturb or self.mu_real_count == 0:
            return z
        return perturb_latent(z, self.mu_real, self.step_size, self.bound, self.config.perturb_eps)

    # ----------------------------------------------------------------------------------------------- contract
    def preprocess(self, images: Sequence[Image.Image], *, train: bool = False,
                   **extras: Any) -> dict[str, torch.Tensor]:
        if extras:
            raise TypeError(f"CRAFT takes no per-image extras, got {sorted(extras)}")
        prep, size = self.config.image_prep(), self.config.resolution
        pixels = [to_tensor01(prepare_square(image, size, prep, train=train)) for image in images]
        return {"pixels": torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)}

    def features_are_deterministic(self, train: bool) -> bool:
        """The inverted latent is a pure function of the image only under ``two_copy`` (frozen inversion)."""
        return self.config.terminal_mode == "two_copy"

    def feature_settings(self, train: bool) -> dict[str, Any]:
        cfg = self.config
        return {"resolution": cfg.resolution, "resample": cfg.resample, "num_steps": cfg.num_steps,
                "scheduler": cfg.pipeline.scheduler_config(), "clip": cfg.pipeline.preprocess_config(),
                "unet_autocast": cfg.unet_autocast}

    def frozen_fingerprint(self) -> str:
        """Digest of the weights the inversion uses (frozen UNet and CLIP encoder, VAE encoder), memoised."""
        if self._frozen_fingerprint is None:
            state = {f"unet.{k}": v for k, v in self.frozen_module("unet").state_dict().items()}
            state.update({f"image_encoder.{k}": v for k, v in self.frozen_module("image_encoder").state_dict().items()})
            state.update({f"vae.encoder.{k}": v for k, v in self.vae.encoder.state_dict().items()})
            state.update({f"vae.quant_conv.{k}": v for k, v in self.vae.quant_conv.state_dict().items()})
            self._frozen_fingerprint = state_fingerprint(state)
        return self._frozen_fingerprint

    def feature_fingerprint(self, train: bool = False) -> str:
        settings = {"detector": self.name, **self.feature_settings(train), "frozen_weights": self.frozen_fingerprint()}
        return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()

    def load_state_strict(self, state: dict[str, torch.Tensor], where: str, include_backbone: bool = True) -> None:
        super().load_state_strict(state, where, include_backbone)
        self._frozen_fingerprint = None

    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverted latent z_T [B, C, h, w] (frozen modules, no gradients): what the on-disk cache keeps."""
        x = batch["pixels"].to(self.device) * 2 - 1
        with torch.no_grad():
            cond = self.conditioning(x, self.frozen_module("image_encoder"))
            return self.invert(self.encode(x), cond)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logit of "fake" (logit difference of the two classes) from the distances d [B]."""
        logits = self.classifier(features)
        return logits[:, 1] - logits[:, 0]

    def run(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole forward: reconstruction ``x_hat``, distance ``d`` and the logit of "fake". In training mode with
        ``labels`` in the batch, the real-class centre is updated before the perturbation."""
        x = batch["pixels"].to(self.device, torch.float32) * 2 - 1
        tuned_encoder = self.tuned_module("image_encoder")
        tuned_cond = self.conditioning(x, tuned_encoder)
        if tuned_encoder is self.frozen_module("image_encoder"):
            frozen_cond = tuned_cond.detach()
        else:
            with torch.no_grad():
                frozen_cond = self.conditioning(x, self.frozen_module("image_encoder"))
        if "features" in batch:
            z = batch["features"].to(self.device, torch.float32)
        else:
            z = self.invert(self.encode(x), frozen_cond)
        if self.training and "labels" in batch:
            self.update_real_centre(z, batch["labels"])
        z = self.perturb(z)
        x_hat = self.decode(self.reconstruct_latent(z, frozen_cond, tuned_cond))
        d = self.distance(x, x_hat)
        return {"x": x, "x_hat": x_hat, "distance": d, "logits": self.head_logits(d)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.run(batch)["logits"]

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L = L_rec + lambda_cls * CE (batch means); also logits, accuracy, mean distances of reals and fakes."""
        cfg = self.config
        out = self.run(batch)
        labels = batch["labels"].to(out["logits"].device, torch.float32)
        d = out["distance"]
        if cfg.recon_loss == "cr":
            recon = contrastive_reconstruction_loss(d, labels, cfg.margin, cfg.delta, cfg.gamma)
        elif cfg.recon_loss == "l1":
            recon = (out["x"] - out["x_hat"]).abs().mean(dim=(1, 2, 3))
        else:
            recon = (out["x"] - out["x_hat"]).pow(2).mean(dim=(1, 2, 3))
        ce = F.binary_cross_entropy_with_logits(out["logits"], labels, reduction="none")
        loss = (recon + cfg.lambda_cls * ce).mean()
        logits = out["logits"].detach()
        accuracy = ((logits >= 0).float() == labels).float().mean()
        return {"loss": loss, "logits": logits, "accuracy": accuracy, "distance": d.detach(),
                "recon_loss": recon.detach().mean(), "ce_loss": ce.detach().mean()}

    # ----------------------------------------------------------------------------------------------- optimiser
    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """One AdamW group per trained module with its own learning rate: encoder, UNet, decoder, classifier."""
        cfg = self.config
        modules = {"classifier": (self.classifier, cfg.lr_classifier)}
        if "encoder" in cfg.finetune:
            modules["encoder"] = (self.tuned_module("image_encoder"), cfg.lr_encoder)
        if "unet" in cfg.finetune:
            modules["unet"] = (self.tuned_module("unet"), cfg.lr_unet)
        if "decoder" in cfg.finetune:
            modules["decoder"] = (nn.ModuleList([self.vae.decoder, self.vae.post_quant_conv]), cfg.lr_decoder)
        groups = []
        for name, (module, lr) in modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
        return groups

    def make_optimizer(self, lr: float | None = None, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW with the per-module learning rates (``lr`` is ignored: every group has its own)."""
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=self.default_lr)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mu_real_count": float(self.mu_real_count),
                "config": to_dict(self.config)}
