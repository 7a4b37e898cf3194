"""Rectified-flow conventions of BAGEL: t = 0 is data, t = 1 is noise, target = eps - x0."""

from __future__ import annotations

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``; identity for ``shift == 1`` (all BAGEL/UniGenDet training runs)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_flow_timesteps(n: int, generator: torch.Generator | None = None, shift: float = 1.0,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal(0, 1) times, one per noised image: ``t = sigmoid(z)``, ``z ~ N(0, 1)``, then shifted."""
    z = torch.randn(n, generator=generator, device=device)
    return shift_timesteps(torch.sigmoid(z), shift)


def noised_latents(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = (1 - t) x0 + t eps`` and the velocity target ``eps - x0``; ``t`` broadcasts per token."""
    t = t.to(x0.dtype)[:, None]
    return (1 - t) * x0 + t * noise, noise - x0
