"""Model FLOPs of a training step on a packed batch, and a measured matmul peak for MFU.

Counts matmul FLOPs only (2 per multiply-add), forward x 3 for forward + backward, without
activation recomputation (model FLOPs, not hardware FLOPs). Each token is charged the linear
layers of the one expert it is routed to; attention is charged for exactly the (query, key)
pairs the packed mask allows, so packing and the noise/causal structure are accounted for.
The frozen VAE encoder is not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from unigendet.data.packing import PackedBatch
from unigendet.models.config import ModelConfig
from unigendet.ops.attention import PackedLayout, dense_mask

TRAIN_MULTIPLIER = 3  # backward costs twice the forward


def allowed_pairs(layout: PackedLayout) -> int:
    """Number of (query, key) pairs the packed mask allows, computed sample by sample."""
    total, start_split = 0, 0
    for n in layout.sample_lens:
        # Per-sample layout keeps the dense mask at [n, n] rather than the whole pack.
        lens, covered = [], 0
        while covered < n:
            lens.append(layout.split_lens[start_split + len(lens)])
            covered += lens[-1]
        modes = layout.attn_modes[start_split : start_split + len(lens)]
        total += int(dense_mask(PackedLayout((n,), tuple(lens), tuple(modes))).sum())
        start_split += len(lens)
    return total


def _llm_linear_params_per_token(cfg: ModelConfig) -> int:
    llm = cfg.llm
    d, hd = llm.hidden_size, llm.head_dim
    attn = d * (llm.num_attention_heads * hd) * 2 + d * (llm.num_key_value_heads * hd) * 2
    mlp = 3 * d * llm.intermediate_size
    return llm.num_hidden_layers * (attn + mlp)


def _vit_linear_params_per_token(cfg: ModelConfig) -> int:
    v = cfg.vit
    layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    return v.num_hidden_layers * layer + v.patch_dim * v.hidden_size


@dataclass
class StepFlops:
    total: float
    tokens: int

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)


def training_step_flops(cfg: ModelConfig, batch: PackedBatch) -> StepFlops:
    llm = cfg.llm
    d = llm.hidden_size
    L = batch.sequence_length
    fwd = 2 * L * _llm_linear_params_per_token(cfg)
    fwd += 2 * 2 * llm.num_attention_heads * llm.head_dim * allowed_pairs(batch.layout) * llm.num_hidden_layers
    fwd += 2 * batch.ce_loss_indexes.numel() * d * llm.vocab_size
    n_vit = batch.vit_token_indexes.numel()
    if n_vit:
        v = cfg.vit
        fwd += 2 * n_vit * _vit_linear_params_per_token(cfg)
        vit_pairs = int((batch.vit_seqlens.double() ** 2).sum())
        fwd += 2 * 2 * v.hidden_size * vit_pairs * v.num_hidden_layers
        fwd += 2 * n_vit * (v.hidden_size * d + d * d)  # connector
    m = batch.vae_token_indexes.numel()
    if m:
        fwd += 2 * m * (cfg.patch_latent_dim * d + 256 * d + d * d)  # vae2llm + time embedder
        fwd += 2 * batch.mse_loss_indexes.numel() * d * cfg.patch_latent_dim  # llm2vae
    fwd += 2 * batch.det_indexes.numel() * (d * d // 4 + d // 4 * cfg.detection_num_outputs)
    return StepFlops(total=float(TRAIN_MULTIPLIER * fwd), tokens=L)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, iters: int = 10) -> float:
    """FLOP/s of a square matmul on this device and dtype: the practical peak MFU is measured against."""
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    elapsed = time.perf_counter() - start
    return 2 * size**3 * iters / elapsed
