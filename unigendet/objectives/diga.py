"""DIGA (stage 2): align the generator's intermediate features with a frozen detector's.

Student: the text-to-image forward; the residual stream after ``student_layer`` decoder layers
at the noised latent tokens goes through the trainable projector. Teacher: a *separate, frozen*
copy of the stage-1 model (the reference reuses the trainable module, so its "teacher" drifts)
reads the ground-truth image (clean VAE block, forensic prompt, ViT block); its final-normed
states after ``teacher_layer`` layers at the ViT patch tokens are resized bilinearly from the
patch grid to the latent grid and flattened, one target per latent token. Loss:
``mse_weight * flow matching + align_weight * (1 - mean cosine)``.

Everything DIGA needs lives here: its config and the checks of that config against the model and
data, the teacher (built once, truncated to ``teacher_layer`` layers), the sample hook that gives
every text-to-image sample the teacher's view of its image, and the loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_positive
from unigendet.data.encoding import SampleEncoder, TextToImageRecord
from unigendet.data.packing import PackedBatch, PlanItem, PlanSample, TextItem, VAEImage, ViTImage
from unigendet.losses import alignment_loss, flow_matching_loss
from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.objectives.common import CountReducer, local_counts, prepare_latents

DEFAULT_TEACHER_PROMPT = (
    'You are a forensic image analyst. This image was generated for the prompt "{caption}". '
    "Give brief visual evidence of authenticity, each point tied to an element of the prompt as "
    "'element: evidence', in 2-3 points."
)

# Name of the teacher's view in ``PlanSample.views`` and ``PackedBatch.views``.
TEACHER_VIEW = "teacher"


@dataclass
class DIGAConfig:
    """The DIGA stage's settings. Paper: teacher features from the detector's final block
    (``teacher_layer: null``); reference code: layer 8 for both. Reference weights: flow matching
    1.0, alignment 0.5."""

    mse_weight: float = 1.0
    align_weight: float = 0.5
    timestep_shift: float = 1.0
    student_layer: int = 8
    teacher_layer: int | None = 8
    # Forensic prompt the teacher reads between the two image blocks; ``{caption}`` is replaced.
    teacher_prompt: str = DEFAULT_TEACHER_PROMPT
    prompt_before_vit: bool = True

    def validate(self) -> None:
        require_non_negative("mse_weight", self.mse_weight)
        require_non_negative("align_weight", self.align_weight)
        if not (self.mse_weight > 0 or self.align_weight > 0):
            raise ConfigError("mse_weight, align_weight: at least one must be > 0")
        require_positive("timestep_shift", self.timestep_shift)
        if self.student_layer < 1 or (self.teacher_layer is not None and self.teacher_layer < 1):
            raise ConfigError("student_layer and teacher_layer count decoder layers from 1")

    def validate_run(self, model: ModelConfig, source_kinds: set[str]) -> None:
        """Checks against the rest of the run (section names in the messages are the run config's)."""
        if not model.diga_projector:
            raise ConfigError("stage diga needs model.diga_projector: true")
        if source_kinds != {"t2i"}:
            raise ConfigError("stage diga trains on text-to-image sources only (data.sources kinds must all be t2i)")
        layers = model.llm.num_hidden_layers
        for name in ("student_layer", "teacher_layer"):
            value = getattr(self, name)
            if value is not None and value > layers:
                raise ConfigError(f"diga.{name} ({value}) exceeds the model's {layers} layers")


def build_teacher(model: UniGenDet, num_layers: int | None) -> UniGenDet:
    """A frozen copy of ``model`` that keeps only its first ``num_layers`` decoder layers (all when
    None). The copy is the one place ``teacher_layer`` is applied: the teacher then runs every layer
    it has, and its final norm reads the states after the last one."""
    teacher = copy.deepcopy(model)
    if num_layers is not None:
        teacher.language_model.model.layers = teacher.language_model.model.layers[:num_layers]
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_view_items(prompt_ids: list[int], vae_image: torch.Tensor, vit_image: torch.Tensor,
                       prompt_before_vit: bool = True) -> list[PlanItem]:
    """What the frozen teacher sees of a ground-truth image: clean VAE block, forensic prompt and ViT
    block. The reference puts the prompt between the two image blocks, so the ViT tokens (whose
    features are the alignment targets) read the caption-conditioned prompt;
    ``prompt_before_vit=False`` gives the plain SMSA order (VAE -> ViT -> prompt)."""
    vae, vit, prompt = VAEImage(vae_image, noised=False), ViTImage(vit_image), TextItem(list(prompt_ids))
    return [vae, prompt, vit] if prompt_before_vit else [vae, vit, prompt]


@dataclass(frozen=True)
class TeacherViewHook:
    """Sample hook for the data pipeline: gives every text-to-image sample the teacher's view of its
    ground-truth image (the same VAE tensor the sample is trained to generate, plus a ViT view)."""

    prompt: str
    prompt_before_vit: bool = True

    def __call__(self, encoder: SampleEncoder, sample: PlanSample, record: TextToImageRecord) -> None:
        vit = encoder.vit_image(record.image, record.key)
        prompt = encoder.encode(self.prompt.replace("{caption}", record.caption))
        sample.views[TEACHER_VIEW] = teacher_view_items(prompt, record.vae_image, vit, self.prompt_before_vit)


def teacher_targets(teacher: UniGenDet, batch: PackedBatch, clean_tokens: torch.Tensor) -> torch.Tensor:
    """Teacher features ``[M_noised, D]`` aligned token by token with the student's noised latents.

    The teacher pack's i-th VAE image is the ground truth of the batch's i-th noised image."""
    tb = batch.views.get(TEACHER_VIEW)
    if tb is None:
        raise ValueError("DIGA needs the teacher's view of every text-to-image sample (data built with "
                         "the DIGA sample hook)")
    latent_shapes = [s for s, noised in zip(batch.latent_shapes, batch.vae_noised.tolist()) if noised]
    if len(tb.vit_shapes) != len(latent_shapes):
        raise ValueError(f"{len(tb.vit_shapes)} teacher views for {len(latent_shapes)} noised images")
    with torch.no_grad():
        out = teacher(tb, clean_tokens, torch.zeros(clean_tokens.shape[0], device=clean_tokens.device))
        vit = out.hidden[tb.vit_token_indexes]
        targets = []
        for feats, (ph, pw), (lh, lw) in zip(vit.split(tb.vit_seqlens.tolist()), tb.vit_shapes, latent_shapes):
            grid = feats.reshape(ph, pw, -1).permute(2, 0, 1)[None].float()
            resized = F.interpolate(grid, size=(lh, lw), mode="bilinear", align_corners=False)
            targets.append(resized[0].permute(1, 2, 0).reshape(lh * lw, -1))
    return torch.cat(targets)


class DIGAObjective:
    """Flow matching plus feature alignment with the frozen teacher; see the module docstring."""

    def __init__(self, cfg: DIGAConfig, teacher: UniGenDet, vae, latent_patch_size: int):
        self.cfg = cfg
        self.teacher = teacher
        self.vae = vae
        self.latent_patch_size = latent_patch_size
        self.t2i_hooks = (TeacherViewHook(cfg.teacher_prompt, cfg.prompt_before_vit),)

    @classmethod
    def build(cls, cfg: DIGAConfig, model: UniGenDet, vae, latent_patch_size: int) -> "DIGAObjective":
        """Copy the teacher from ``model``: call this on the stage-1 weights, before anything is
        frozen or adapted."""
        return cls(cfg, build_teacher(model, cfg.teacher_layer), vae, latent_patch_size)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.teacher.to(device, dtype=dtype)

    def __call__(self, model, batch: PackedBatch, generator: torch.Generator | None = None,
                 reduce_counts: CountReducer = local_counts, world_size: int = 1):
        latents = prepare_latents(batch, self.vae, self.latent_patch_size, generator, self.cfg.timestep_shift)
        if latents is None or batch.mse_loss_indexes.numel() == 0:
            raise ValueError("a DIGA batch needs text-to-image samples (noised VAE images)")
        out = model(batch, latents.tokens, latents.timesteps, capture_layer=self.cfg.student_layer, project_captured=True)
        counts = reduce_counts(torch.tensor([float(batch.mse_loss_indexes.numel())], device=out.hidden.device))
        mse = flow_matching_loss(out.velocity, latents.target, float(counts[0]) / world_size)
        target = teacher_targets(self.teacher, batch, latents.clean[batch.mse_token_mask.to(latents.clean.device)])
        # Reference: mean over this rank's latent tokens, no cross-rank normalisation.
        align = alignment_loss(out.projected, target.to(out.projected.dtype), out.projected.shape[0])
        total = self.cfg.mse_weight * mse + self.cfg.align_weight * align
        return total, {"mse": mse.detach(), "align": align.detach(), "loss": total.detach()}
