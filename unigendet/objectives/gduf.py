"""GDUF (stage 1): explanation CE + detection loss + flow matching on mixed packs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_positive
from unigendet.data.packing import PackedBatch
from unigendet.losses import detection_loss, flow_matching_loss, token_ce_loss
from unigendet.models.bridges import fake_probability
from unigendet.objectives.common import CountReducer, local_counts, prepare_latents


@dataclass
class GDUFLossConfig:
    """The GDUF stage's settings: its loss weights. Defaults are the official code's (CE 1.0,
    detection 0.2, MSE 1.0); the paper uses 1 / 1 / 1. ``detection_normalization``: "local" = mean
    over this rank's detection samples (reference), "global" = sum over the global count like CE and MSE."""

    ce_weight: float = 1.0
    mse_weight: float = 1.0
    det_weight: float = 0.2
    detection_normalization: Literal["local", "global"] = "local"
    timestep_shift: float = 1.0

    def validate(self) -> None:
        weights = ("ce_weight", "mse_weight", "det_weight")
        for name in weights:
            require_non_negative(name, getattr(self, name))
        if not any(getattr(self, name) > 0 for name in weights):
            raise ConfigError("ce_weight, mse_weight, det_weight: at least one must be > 0")
        require_positive("timestep_shift", self.timestep_shift)


class GDUFObjective:
    """Explanation CE, detection loss and flow matching, each normalised by its global count."""

    # GDUF trains on the samples as the sources encode them: no extra views.
    t2i_hooks = ()

    def __init__(self, loss: GDUFLossConfig, vae, latent_patch_size: int, detection_kind: str):
        self.loss = loss
        self.vae = vae
        self.latent_patch_size = latent_patch_size
        self.detection_kind = detection_kind

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to move: the objective holds no modules of its own (the VAE is the trainer's)."""

    def __call__(
        self,
        model,
        batch: PackedBatch,
        generator: torch.Generator | None = None,
        reduce_counts: CountReducer = local_counts,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = prepare_latents(batch, self.vae, self.latent_patch_size, generator, self.loss.timestep_shift)
        out = model(
            batch,
            latent_tokens=None if latents is None else latents.tokens,
            latent_timesteps=None if latents is None else latents.timesteps,
        )
        device = out.hidden.device
        # One all-reduce for all counts; each loss divides its local sum by global_count / world_size
        # so that gradient averaging across ranks yields the global per-token mean.
        counts = reduce_counts(torch.tensor(
            [batch.ce_loss_indexes.numel(), batch.mse_loss_indexes.numel(), batch.det_indexes.numel()],
            dtype=torch.float32, device=device,
        ))
        n_ce, n_mse, n_det = (float(c) / world_size for c in counts)
        total = out.hidden.new_zeros((), dtype=torch.float32)
        # Metrics stay detached tensors: converting here would sync the GPU every step.
        metrics: dict[str, torch.Tensor] = {}
        if out.ce_logits is not None:
            ce = token_ce_loss(out.ce_logits, batch.ce_label_ids, n_ce)
            total = total + self.loss.ce_weight * ce
            metrics["ce"] = ce.detach()
        if out.velocity is not None:
            mse = flow_matching_loss(out.velocity, latents.target, n_mse)
            total = total + self.loss.mse_weight * mse
            metrics["mse"] = mse.detach()
        if out.det_logits is not None:
            denom = batch.det_indexes.numel() if self.loss.detection_normalization == "local" else n_det
            det = detection_loss(out.det_logits, batch.det_labels, self.detection_kind, denom)
            total = total + self.loss.det_weight * det
            metrics["det"] = det.detach()
            p_fake = fake_probability(out.det_logits.detach(), self.detection_kind)
            metrics["det_acc"] = ((p_fake >= 0.5).long() == batch.det_labels).float().mean()
        metrics["loss"] = total.detach()
        return total, metrics
