"""Training the FLUX-layout autoencoder itself, for geometries with no released weights (the demo's tiny VAE).

UniGenDet never trains its VAE: BAGEL's FLUX autoencoder is frozen. A model of another geometry has no such weights,
and a random autoencoder gives latents that carry no image content, so generation decodes to noise. This loop trains
the autoencoder as latent-diffusion autoencoders are trained, without the adversarial term: per-pixel L1 plus MSE
reconstruction of the posterior *sample*, and ``kl_weight`` times the KL divergence of the posterior to N(0, I)
(small, so latents stay informative but bounded). Images are [-1, 1], ``[3, H, W]`` at a multiple of the
downsample factor; batches are random crops of ``crop`` pixels with random flips.

The trained weights are what GDUF, DIGA and generation then use (``init.vae`` names the file). :func:`psnr`
measures reconstruction on images the loop did not see.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unigendet.config.loader import ConfigError
from unigendet.models.vae import FluxVAE

logger = logging.getLogger(__name__)


@dataclass
class AutoencoderTrainConfig:
    """Steps, batch of ``crop``-pixel random crops, AdamW learning rate, KL weight and seed."""

    steps: int = 300
    batch_size: int = 8
    crop: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.crop < 8:
            raise ConfigError("steps must be >= 0, batch_size >= 1 and crop >= 8")
        if self.lr <= 0 or self.kl_weight < 0:
            raise ConfigError("lr must be > 0 and kl_weight >= 0")


def _random_crops(images: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    picks = torch.randint(0, len(images), (count,), generator=generator).tolist()
    crops = []
    for index in picks:
        image = images[index]
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - size + 1, (), generator=generator))
        left = int(torch.randint(0, w - size + 1, (), generator=generator))
        crop = image[:, top:top + size, left:left + size]
        if bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


def reconstruction_loss(vae: FluxVAE, batch: torch.Tensor, generator: torch.Generator, kl_weight: float
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + MSE of the decoded posterior sample, plus ``kl_weight`` x KL(posterior || N(0, I)) per element."""
    autoencoder = vae.autoencoder
    posterior = autoencoder.encode(batch).latent_dist
    decoded = autoencoder.decode(posterior.sample(generator=generator)).sample
    l1 = F.l1_loss(decoded, batch)
    mse = F.mse_loss(decoded, batch)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}


def train_autoencoder(vae: FluxVAE, images: list[torch.Tensor], cfg: AutoencoderTrainConfig) -> list[dict[str, float]]:
    """Train ``vae``'s autoencoder in place on ``images`` (each ``[3, H, W]`` in [-1, 1], at least ``crop`` on
    each side); returns the per-step losses. The VAE is frozen again (and in eval mode) afterwards."""
    cfg.validate()
    if not images:
        raise ValueError("train_autoencoder needs at least one image")
    small = [tuple(img.shape[-2:]) for img in images if min(img.shape[-2:]) < cfg.crop]
    if small:
        raise ValueError(f"{len(small)} image(s) smaller than the {cfg.crop}-pixel crop, e.g. {small[0]}")
    if cfg.crop % vae.cfg.downsample:
        raise ValueError(f"crop {cfg.crop} is not a multiple of the VAE downsample factor {vae.cfg.downsample}")
    autoencoder = vae.autoencoder
    generator = torch.Generator().manual_seed(cfg.seed)
    autoencoder.requires_grad_(True)
    autoencoder.train()
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    history = []
    try:
        for step in range(cfg.steps):
            batch = _random_crops(images, cfg.batch_size, cfg.crop, generator).to(vae.dtype)
            loss, parts = reconstruction_loss(vae, batch, generator, cfg.kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
            optimizer.step()
            history.append({"step": step + 1, "loss": float(loss.detach()), **parts})
    finally:
        autoencoder.requires_grad_(False)
        autoencoder.eval()
    if history:
        logger.info("autoencoder: %d steps, loss %.4f -> %.4f", len(history), history[0]["loss"], history[-1]["loss"])
    return history


@torch.no_grad()
def psnr(vae: FluxVAE, images: list[torch.Tensor], batch_size: int = 32) -> float:
    """Mean PSNR (dB, images in [-1, 1] mapped to [0, 1]) of the posterior-mean reconstruction of each image.
    Images of one size are encoded ``batch_size`` at a time."""
    values = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        same_size = len({tuple(img.shape) for img in chunk}) == 1
        groups = [torch.stack(chunk)] if same_size else [img[None] for img in chunk]
        for batch in groups:
            decoded = vae.decode(vae.encode(batch.to(vae.dtype), sample=False)).float().clamp(-1, 1)
            mse = ((decoded + 1) / 2 - (batch.float() + 1) / 2).pow(2).flatten(1).mean(1)
            values += [10 * math.log10(1.0 / max(float(m), 1e-12)) for m in mse]
    return sum(values) / len(values)
