"""DIGA (stage 2): align the generator's intermediate features with a frozen detector's.

Student: the text-to-image forward; the residual stream after ``student_layer`` decoder layers
at the noised latent tokens goes through the trainable projector. Teacher: a *separate, frozen*
copy of the stage-1 model (the reference reuses the trainable module, so its "teacher" drifts)
reads the ground-truth image (clean VAE block, forensic prompt, ViT block); its final-normed
states after ``teacher_layer`` layers at the ViT patch tokens are resized bilinearly from the
patch grid to the latent grid and flattened, one target per latent token. Loss:
``mse_weight * flow matching + align_weight * (1 - mean cosine)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unigendet.config.loader import ConfigError
from unigendet.data.packing import PackedBatch
from unigendet.losses import alignment_loss, flow_matching_loss
from unigendet.objectives.common import CountReducer, local_counts, prepare_latents

DEFAULT_TEACHER_PROMPT = (
    'You are a forensic image analyst. This image was generated for the prompt "{caption}". '
    "Give brief visual evidence of authenticity, each point tied to an element of the prompt as "
    "'element: evidence', in 2-3 points."
)


@dataclass
class DIGAConfig:
    """Stage-2 settings. Paper: teacher features from the detector's final block
    (``teacher_layer: null``); reference code: layer 8 for both. Reference weight 0.5."""

    align_weight: float = 0.5
    student_layer: int = 8
    teacher_layer: int | None = 8
    teacher_prompt: str = DEFAULT_TEACHER_PROMPT
    prompt_before_vit: bool = True

    def validate(self) -> None:
        if self.align_weight < 0:
            raise ConfigError("align_weight must be non-negative")
        if self.student_layer < 1 or (self.teacher_layer is not None and self.teacher_layer < 1):
            raise ConfigError("student_layer and teacher_layer count decoder layers from 1")


def teacher_targets(teacher, batch: PackedBatch, clean_tokens: torch.Tensor, layer: int | None) -> torch.Tensor:
    """Teacher features ``[M_noised, D]`` aligned token by token with the student's noised latents."""
    tb = batch.teacher
    if tb is None:
        raise ValueError("DIGA needs batch.teacher (data built with a DIGA teacher prompt)")
    with torch.no_grad():
        out = teacher(tb, clean_tokens, torch.zeros(clean_tokens.shape[0], device=clean_tokens.device), num_layers=layer)
        vit = out.hidden[tb.vit_token_indexes]
        targets = []
        latent_shapes = [s for s, noised in zip(batch.latent_shapes, batch.vae_noised.tolist()) if noised]
        for feats, (ph, pw), (lh, lw) in zip(vit.split(tb.vit_seqlens.tolist()), tb.vit_shapes, latent_shapes):
            grid = feats.reshape(ph, pw, -1).permute(2, 0, 1)[None].float()
            resized = F.interpolate(grid, size=(lh, lw), mode="bilinear", align_corners=False)
            targets.append(resized[0].permute(1, 2, 0).reshape(lh * lw, -1))
    return torch.cat(targets)


class DIGAObjective:
    def __init__(self, cfg: DIGAConfig, teacher, vae, latent_patch_size: int, mse_weight: float = 1.0,
                 timestep_shift: float = 1.0):
        self.cfg = cfg
        self.teacher = teacher
        self.vae = vae
        self.latent_patch_size = latent_patch_size
        self.mse_weight = mse_weight
        self.timestep_shift = timestep_shift

    def __call__(self, model, batch: PackedBatch, generator: torch.Generator | None = None,
                 reduce_counts: CountReducer = local_counts, world_size: int = 1):
        latents = prepare_latents(batch, self.vae, self.latent_patch_size, generator, self.timestep_shift)
        if latents is None or batch.mse_loss_indexes.numel() == 0:
            raise ValueError("a DIGA batch needs text-to-image samples (noised VAE images)")
        out = model(batch, latents.tokens, latents.timesteps, capture_layer=self.cfg.student_layer, project_captured=True)
        counts = reduce_counts(torch.tensor([float(batch.mse_loss_indexes.numel())], device=out.hidden.device))
        mse = flow_matching_loss(out.velocity, latents.target, float(counts[0]) / world_size)
        target = teacher_targets(self.teacher, batch, latents.clean[batch.mse_token_mask.to(latents.clean.device)],
                                 self.cfg.teacher_layer)
        # Reference: mean over this rank's latent tokens, no cross-rank normalisation.
        align = alignment_loss(out.projected, target.to(out.projected.dtype), out.projected.shape[0])
        total = self.mse_weight * mse + self.cfg.align_weight * align
        return total, {"mse": mse.detach(), "align": align.detach(), "loss": total.detach()}
