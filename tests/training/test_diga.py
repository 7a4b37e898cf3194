"""DIGA: the teacher stays frozen, the alignment loss reaches the optimizer and goes down."""

import torch
from helpers import SPECIAL, geometry, rand_ids, tiny_config

from unigendet.data.packing import (
    PackBuilder,
    PlanSample,
    diga_teacher_sample,
    plan_num_tokens,
    text_to_image_sample,
)
from unigendet.models.unigendet import UniGenDet
from unigendet.objectives.common import prepare_latents
from unigendet.objectives.diga import DIGAConfig, DIGAObjective, teacher_targets
from unigendet.training.builders import apply_freeze, build_teacher
from unigendet.training.config import FreezeConfig

DIGA_FREEZE = FreezeConfig(vit=True, connector=True, und_expert=True, embeddings=True, lm_head=True, detection_head=True)


class _StubVAE:
    """Deterministic stand-in for the FLUX VAE (average-pool by 8, 16 channels): DIGA never trains it."""

    def encode_list(self, images, generator=None, sample=True):
        return [torch.nn.functional.avg_pool2d(img[None], 8)[0].repeat(6, 1, 1)[:16] for img in images]


def _t2i_with_teacher(cfg, g, hw=(32, 48)):
    image = torch.rand(3, *hw, generator=g) * 2 - 1
    vit = torch.rand(3, 28, 42, generator=g) * 2 - 1
    items = text_to_image_sample(rand_ids(g, 5), image)
    sample = PlanSample(items, plan_num_tokens(items, geometry(cfg)), "t2i", "k")
    sample.teacher_items = diga_teacher_sample(rand_ids(g, 6), image, vit)
    return sample


def _setup(seed=0):
    cfg = tiny_config(diga_projector=True)
    torch.manual_seed(seed)
    model = UniGenDet(cfg)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    teacher = build_teacher(model, layers=1)
    apply_freeze(model, DIGA_FREEZE)
    g = torch.Generator().manual_seed(seed)
    batch = PackBuilder(SPECIAL, geometry(cfg)).build_with_teacher([_t2i_with_teacher(cfg, g), _t2i_with_teacher(cfg, g, (16, 32))])
    objective = DIGAObjective(DIGAConfig(align_weight=1.0, student_layer=1, teacher_layer=1), teacher, _StubVAE(),
                              cfg.latent_patch_size)
    return cfg, model, teacher, batch, objective


def test_teacher_targets_align_with_noised_latent_tokens():
    cfg, model, teacher, batch, objective = _setup()
    lat = prepare_latents(batch, _StubVAE(), cfg.latent_patch_size, torch.Generator().manual_seed(0))
    target = teacher_targets(teacher, batch, lat.clean[batch.mse_token_mask], layer=1)
    assert target.shape == (batch.mse_loss_indexes.numel(), cfg.llm.hidden_size)
    assert batch.teacher.attn_modes == ["full", "causal", "full"] * 2  # VAE, prompt, ViT per image
    assert len(teacher.language_model.model.layers) == 1 and not any(p.requires_grad for p in teacher.parameters())


def test_diga_trains_generator_and_projector_only_and_alignment_falls():
    cfg, model, teacher, batch, objective = _setup()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    params_before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    aligns = []
    for step in range(25):
        loss, metrics = objective(model, batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            # The projector is reached only through the alignment loss: a gradient there proves
            # the alignment term reaches the optimizer (the reference's released loop drops it).
            assert model.diga_projector[0].weight.grad.abs().sum() > 0
        optimizer.step()
        aligns.append(metrics["align"].item())
    assert aligns[-1] < 0.7 * aligns[0]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, params_before[k])}
    assert any(k.startswith("diga_projector.") for k in changed)
    assert any("_moe_gen" in k for k in changed)
    assert not any(k.startswith(("vit_model.", "connector.", "detection_head.")) for k in changed)
    assert not any(k.startswith("language_model.") and "_moe_gen" not in k for k in changed)
