"""Pieces shared by objectives: what the trainer needs from one, VAE encoding, flow-matching noising,
count reduction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from unigendet.data.packing import PackedBatch
from unigendet.losses import noised_latents, sample_flow_timesteps
from unigendet.models.latents import encode_pack_latents

# Sums a count over all data-parallel ranks. Identity on one process; the trainer injects an
# all-reduce so that losses are normalised by global token counts as in the reference.
CountReducer = Callable[[torch.Tensor], torch.Tensor]


def local_counts(t: torch.Tensor) -> torch.Tensor:
    return t


class Objective(Protocol):
    """A training stage's objective, as the trainer uses it."""

    # Sample hooks the data pipeline calls for every text-to-image sample (extra views the loss reads).
    t2i_hooks: tuple

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the objective's own modules (e.g. a frozen teacher) to the training device."""

    def __call__(self, model, batch: PackedBatch, generator: torch.Generator | None = None,
                 reduce_counts: CountReducer = local_counts,
                 world_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, detached metrics) of one packed batch."""


@dataclass
class LatentInputs:
    tokens: torch.Tensor  # [M, patch_latent_dim] model input (x_t for noised images, x0 for clean ones)
    timesteps: torch.Tensor  # [M] flow time per token (0 for clean images)
    target: torch.Tensor  # [M_noised, patch_latent_dim] velocity target eps - x0 at noised tokens
    clean: torch.Tensor  # [M, patch_latent_dim] x0


def prepare_latents(
    batch: PackedBatch,
    vae,
    latent_patch_size: int,
    generator: torch.Generator | None,
    timestep_shift: float = 1.0,
) -> LatentInputs | None:
    """Encode the batch's VAE images (posterior samples, one size group at a time), patchify, draw
    per-image flow times for noised images and noise them. Draw order as the reference: VAE
    posterior noise first, then flow noise."""
    x0 = encode_pack_latents(batch, vae, latent_patch_size, generator)
    if x0 is None:
        return None
    n_img = len(batch.vae_images)
    t_img = torch.zeros(n_img, device=x0.device)
    noised = batch.vae_noised.to(x0.device)
    if noised.any():
        t_img[noised] = sample_flow_timesteps(int(noised.sum()), generator, timestep_shift, device=x0.device)
    t_tok = t_img[batch.latent_image_ids.to(x0.device)]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t, target = noised_latents(x0, t_tok, noise)
    mask = batch.mse_token_mask.to(x0.device)
    return LatentInputs(tokens=x_t, timesteps=t_tok, target=target[mask], clean=x0)
