"""Test helper: write diffusers ``AutoencoderKL`` weights in the original BFL/LDM ``ae.safetensors`` layout.

This is deliberately an independent implementation of the BFL <-> diffusers VAE key naming (token-walking here,
regexes in ``unigendet.models.vae``), so that a round trip through a BFL file checks both directions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from unigendet.models.config import VAEConfig
from unigendet.models.vae import FluxVAE

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _num_levels(state_dict: dict) -> int:
    levels = {int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks.")}
    return max(levels) + 1


def _rename(key: str, n_levels: int) -> str:
    t = key.split(".")
    side, rest = t[0], t[1:]
    out = [side]
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out", *rest[1:]])
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] in ("down_blocks", "up_blocks"):
        level = int(rest[1])
        if rest[0] == "down_blocks":
            out += ["down", str(level)]
        else:
            out += ["up", str(n_levels - 1 - level)]  # BFL counts decoder levels bottom-up
        if rest[2] == "resnets":
            layer = rest[4] if rest[4] != "conv_shortcut" else "nin_shortcut"
            return ".".join(out + ["block", rest[3], layer, *rest[5:]])
        if rest[2] in ("downsamplers", "upsamplers"):
            assert rest[3] == "0" and rest[4] == "conv", key
            return ".".join(out + ["downsample" if rest[2] == "downsamplers" else "upsample", "conv", *rest[5:]])
    if rest[0] == "mid_block":
        out.append("mid")
        if rest[1] == "resnets":
            layer = rest[3] if rest[3] != "conv_shortcut" else "nin_shortcut"
            return ".".join(out + [f"block_{int(rest[2]) + 1}", layer, *rest[4:]])
        if rest[1] == "attentions":
            assert rest[2] == "0", key
            name = _ATTN[rest[3]]
            param = rest[5:] if rest[3] == "to_out" else rest[4:]  # to_out.0.weight
            return ".".join(out + ["attn_1", name, *param])
    raise KeyError(f"unmapped diffusers key {key}")


def diffusers_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> BFL key names; attention q/k/v/proj_out as 1x1 conv weights."""
    n_levels = _num_levels(state_dict)
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, n_levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and ".attn_1.norm." not in new and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value.detach().clone().contiguous()
    return out


def randomize_norms(vae: FluxVAE, generator: torch.Generator) -> None:
    """GroupNorm affine params start at 1/0 in diffusers; perturb them so a swapped norm mapping shows up."""
    with torch.no_grad():
        for name, p in vae.autoencoder.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))


def write_bfl_vae(path: str | Path, cfg: VAEConfig, seed: int) -> FluxVAE:
    """Build a random tiny VAE, write it to ``path`` in BFL layout, and return the source model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = FluxVAE(cfg)
    randomize_norms(vae, generator)
    save_file(diffusers_to_bfl(vae.autoencoder.state_dict()), str(path))
    return vae
