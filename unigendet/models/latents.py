"""Clean latent tokens of a packed batch: its VAE images encoded and patchified, in pack order.

This is the model's latent input before any flow-matching noise; training noises it
(``unigendet.objectives.common.prepare_latents``), detection-head scoring feeds it as is.
"""

from __future__ import annotations

import torch

from unigendet.data.packing import PackedBatch
from unigendet.data.transforms import patchify_latent


def encode_pack_latents(batch: PackedBatch, vae, latent_patch_size: int,
                        generator: torch.Generator | None) -> torch.Tensor | None:
    """``x0 [M, patch_latent_dim]`` (fp32) of the batch's VAE images (posterior samples drawn from
    ``generator`` in image order), or None when the batch has no VAE image."""
    if not batch.vae_images:
        return None
    latents = vae.encode_list(batch.vae_images, generator=generator)
    x0 = torch.cat([patchify_latent(z, latent_patch_size) for z in latents]).float()
    expected = batch.num_latent_tokens
    if x0.shape[0] != expected:
        raise ValueError(f"VAE produced {x0.shape[0]} latent tokens, the pack expects {expected}")
    return x0
