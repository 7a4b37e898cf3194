"""Pieces shared by objectives: VAE encoding, flow-matching noising, count reduction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from unigendet.data.packing import PackedBatch
from unigendet.data.transforms import patchify_latent
from unigendet.losses import noised_latents, sample_flow_timesteps

# Sums a count over all data-parallel ranks. Identity on one process; the trainer injects an
# all-reduce so that losses are normalised by global token counts as in the reference.
CountReducer = Callable[[torch.Tensor], torch.Tensor]


def local_counts(t: torch.Tensor) -> torch.Tensor:
    return t


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
    if not batch.vae_images:
        return None
    latents = vae.encode_list(batch.vae_images, generator=generator)
    x0 = torch.cat([patchify_latent(z, latent_patch_size) for z in latents]).float()
    expected = batch.num_latent_tokens
    if x0.shape[0] != expected:
        raise ValueError(f"VAE produced {x0.shape[0]} latent tokens, the pack expects {expected}")
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
