"""Modules that carry images into the LLM's hidden space and back (BAGEL's connector, position tables and
timestep embedder), and UniGenDet's detection head and DIGA projector."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers.activations import ACT2FN

from unigendet.losses.core import HEAD_CLASS_FAKE


def sincos_2d_table(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos table ``[grid_size**2, embed_dim]`` (MAE/DiT recipe).

    Row ``r * G + c`` is ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_k = 10000^(-k / (D/4))``:
    the first half encodes the column, the second the row. Built in float64 as the reference does,
    so the fp32 table matches it bit for bit.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by 4 for a 2-D sin-cos table")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


class PositionEmbedding2D(nn.Module):
    """Lookup into a fixed sin-cos table by flattened grid id ``row * G + col``.

    The table is a non-persistent buffer: it is a pure function of the geometry, so checkpoints need
    not carry it (BAGEL files do; the loader drops those keys)."""

    def __init__(self, grid_size: int, hidden_size: int):
        super().__init__()
        self.grid_size = grid_size
        table = torch.from_numpy(sincos_2d_table(hidden_size, grid_size)).float()
        self.register_buffer("pos_embed", table, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """Sinusoid of the flow time ``t`` in [0, 1] (not scaled by 1000), cos half first, then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class MLPConnector(nn.Module):
    """ViT features -> LLM width: ``fc2(act(fc1(x)))`` (keys ``fc1``/``fc2`` as in BAGEL)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DetectionHead(nn.Sequential):
    """UniGenDet's real/fake head: LayerNorm -> Linear(D, D/4) -> ReLU -> Linear(D/4, K).

    K = 2 for the official softmax head (class 0 = fake, 1 = real, checkpoint compatible) or 1 for
    a BCE head (logit of "fake"). LayerNorm keeps PyTorch's default eps (1e-5) as the reference."""

    def __init__(self, hidden_size: int, num_outputs: int = 2):
        super().__init__(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden_size // 4),
            nn.ReLU(),
            nn.Linear(hidden_size // 4, num_outputs),
        )


def fake_probability(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """p(fake) ``[...]`` (fp32) from :class:`DetectionHead` logits ``[..., K]``: the softmax's "fake" class for
    the 2-class head (``kind="ce"``), the sigmoid of the single logit for the BCE head (``kind="bce"``)."""
    if kind == "ce":
        return logits.float().softmax(-1)[..., HEAD_CLASS_FAKE]
    if kind == "bce":
        return logits.float().squeeze(-1).sigmoid()
    raise ValueError(f"unknown detection head kind {kind!r}; expected 'ce' or 'bce'")


class AlignmentProjector(nn.Sequential):
    """DIGA projector: Linear(D, m*D) -> GELU(erf) -> Linear(m*D, D)."""

    def __init__(self, hidden_size: int, mult: int = 4):
        super().__init__(nn.Linear(hidden_size, mult * hidden_size), nn.GELU(), nn.Linear(mult * hidden_size, hidden_size))
