"""DIGA: the teacher stays frozen, the alignment loss reaches the optimizer and goes down; the teacher
is truncated once; the data pipeline gets the teacher's views through the objective's sample hook."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, SPECIAL, geometry, rand_ids, tiny_config
from PIL import Image

from unigendet.config.loader import ConfigError
from unigendet.data.packing import (
    CFGDropout,
    PackBuilder,
    PlanSample,
    plan_num_tokens,
    text_to_image_sample,
)
from unigendet.data.pipeline import DataConfig, PackedDataLoader, PackingConfig, SourceConfig, TransformConfig
from unigendet.data.tokenizer import build_tiny_tokenizer, special_token_ids
from unigendet.models.unigendet import UniGenDet
from unigendet.objectives.common import prepare_latents
from unigendet.objectives.diga import (
    DEFAULT_TEACHER_PROMPT,
    TEACHER_VIEW,
    DIGAConfig,
    DIGAObjective,
    teacher_targets,
    teacher_view_items,
)
from unigendet.training.config import load_train_config
from unigendet.training.freeze import FreezeConfig, apply_freeze

DIGA_FREEZE = FreezeConfig(vit=True, connector=True, und_expert=True, embeddings=True, lm_head=True,
                           detection_head=True)


class _StubVAE:
    """Deterministic stand-in for the FLUX VAE (average-pool by 8, 16 channels): DIGA never trains it."""

    def encode_list(self, images, generator=None, sample=True):
        return [torch.nn.functional.avg_pool2d(img[None], 8)[0].repeat(6, 1, 1)[:16] for img in images]


def _t2i_with_teacher(cfg, g, hw=(32, 48)):
    image = torch.rand(3, *hw, generator=g) * 2 - 1
    vit = torch.rand(3, 28, 42, generator=g) * 2 - 1
    items = text_to_image_sample(rand_ids(g, 5), image)
    sample = PlanSample(items, plan_num_tokens(items, geometry(cfg)), "t2i", "k")
    sample.views[TEACHER_VIEW] = teacher_view_items(rand_ids(g, 6), image, vit)
    return sample


def _setup(seed=0):
    cfg = tiny_config(diga_projector=True)
    torch.manual_seed(seed)
    model = UniGenDet(cfg)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    objective = DIGAObjective.build(DIGAConfig(align_weight=1.0, student_layer=1, teacher_layer=1), model, _StubVAE(),
                                    cfg.latent_patch_size)
    teacher = objective.teacher
    apply_freeze(model, DIGA_FREEZE)
    g = torch.Generator().manual_seed(seed)
    samples = [_t2i_with_teacher(cfg, g), _t2i_with_teacher(cfg, g, (16, 32))]
    batch = PackBuilder(SPECIAL, geometry(cfg)).build_samples(samples)
    return cfg, model, teacher, batch, objective


def test_teacher_targets_align_with_noised_latent_tokens():
    cfg, model, teacher, batch, objective = _setup()
    lat = prepare_latents(batch, _StubVAE(), cfg.latent_patch_size, torch.Generator().manual_seed(0))
    target = teacher_targets(teacher, batch, lat.clean[batch.mse_token_mask])
    assert target.shape == (batch.mse_loss_indexes.numel(), cfg.llm.hidden_size)
    assert batch.views[TEACHER_VIEW].attn_modes == ["full", "causal", "full"] * 2  # VAE, prompt, ViT per image
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


# ---------------------------------------------------------------- teacher_layer: applied once


def test_teacher_keeps_teacher_layer_layers_and_equals_the_model_stopped_there():
    """The teacher is truncated when built and then runs every layer it has: its features are the
    stage-1 model's after ``teacher_layer`` layers (no second truncation at forward time)."""
    cfg, model, teacher, batch, _ = _setup()
    assert cfg.llm.num_hidden_layers == 2 and len(teacher.language_model.model.layers) == 1
    tb = batch.views[TEACHER_VIEW]
    clean = prepare_latents(batch, _StubVAE(), cfg.latent_patch_size, torch.Generator().manual_seed(0)).clean
    clean = clean[batch.mse_token_mask]
    zeros = torch.zeros(clean.shape[0])
    with torch.no_grad():
        truncated = teacher(tb, clean, zeros).hidden
        stopped = model(tb, clean, zeros, num_layers=1).hidden
        full = model(tb, clean, zeros).hidden
    torch.testing.assert_close(truncated, stopped)
    assert not torch.allclose(truncated, full)


def test_teacher_layer_null_keeps_every_layer():
    cfg = tiny_config(diga_projector=True)
    objective = DIGAObjective.build(DIGAConfig(student_layer=1, teacher_layer=None), UniGenDet(cfg), _StubVAE(),
                                    cfg.latent_patch_size)
    assert len(objective.teacher.language_model.model.layers) == cfg.llm.num_hidden_layers


def test_teacher_layer_beyond_the_model_is_one_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_train_config(str(REPO / "configs/train/diga_demo.yaml"), ["diga.teacher_layer=99"])
    message = str(err.value)
    assert message.startswith("diga.teacher_layer (99) exceeds the model's 4 layers")
    assert message.count("teacher_layer") == 1
    with pytest.raises(ConfigError, match=r"^diga\.student_layer \(3\)"):
        DIGAConfig(student_layer=3, teacher_layer=1).validate_run(tiny_config(diga_projector=True), {"t2i"})
    with pytest.raises(ConfigError, match="model.diga_projector"):
        DIGAConfig(student_layer=1, teacher_layer=1).validate_run(tiny_config(), {"t2i"})


# ---------------------------------------------------------------- data: the teacher view comes from the hook

CAPTIONS = ["a red square", "a blue circle on grey", "green stripes", "a small yellow dot"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + 8 * i, 36), (60 * i, 120, 200 - 40 * i)).save(buf, format="PNG")
    return buf.getvalue()


def _t2i_data(tmp_path) -> DataConfig:
    path = tmp_path / "t2i.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _png(i), "path": None} for i in range(len(CAPTIONS))],
                             "caption": CAPTIONS}), path)
    source = SourceConfig(kind="t2i", data_files=[str(path)], cache_dir=str(tmp_path / "hf_cache"))
    return DataConfig(sources={"t2i": source},
                      packing=PackingConfig(expected_num_tokens=40, max_num_tokens=400, prefer_buffer_before=20,
                                            max_buffer_size=4, max_num_tokens_per_sample=400),
                      vit_transform=TransformConfig(56, 28, 14, 4096), vae_transform=TransformConfig(64, 32, 16, 4096),
                      cfg_dropout=CFGDropout(0.0, 0.0, 0.0), num_workers=0)


def _first_batch(loader: PackedDataLoader):
    batches = iter(loader)
    batch = next(batches)
    batches.close()
    loader.close()
    return batch


def test_data_pipeline_builds_teacher_views_through_the_objectives_hook(tmp_path):
    cfg = tiny_config(diga_projector=True)
    data = _t2i_data(tmp_path)
    tokenizer = build_tiny_tokenizer(CAPTIONS + [DEFAULT_TEACHER_PROMPT], vocab_size=400)
    special = special_token_ids(tokenizer)
    objective = DIGAObjective.build(DIGAConfig(student_layer=1, teacher_layer=1), UniGenDet(cfg), _StubVAE(),
                                    cfg.latent_patch_size)
    batch = _first_batch(PackedDataLoader.build(data, tokenizer, special, geometry(cfg), 0, 1,
                                                t2i_hooks=objective.t2i_hooks))
    teacher = batch.views[TEACHER_VIEW]
    noised = [img for img, z in zip(batch.vae_images, batch.vae_noised.tolist()) if z]
    assert len(noised) >= 2 and teacher.attn_modes == ["full", "causal", "full"] * len(noised)
    assert all(torch.equal(a, b) for a, b in zip(teacher.vae_images, noised))  # the ground truth, not a re-draw
    lat = prepare_latents(batch, _StubVAE(), cfg.latent_patch_size, torch.Generator().manual_seed(0))
    target = teacher_targets(objective.teacher, batch, lat.clean[batch.mse_token_mask])
    assert target.shape == (batch.mse_loss_indexes.numel(), cfg.llm.hidden_size)

    # Without the hook the same data has no views, and the objective says what is missing.
    plain = _first_batch(PackedDataLoader.build(data, tokenizer, special, geometry(cfg), 0, 1))
    assert plain.views == {}
    with pytest.raises(ValueError, match="sample hook"):
        teacher_targets(objective.teacher, plain, lat.clean[batch.mse_token_mask])
