"""Freezing (``apply_freeze``) and LoRA (``apply_lora`` + ``merge_lora_state``) on the tiny UniGenDet."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import builder, tiny_config
from torch import nn

from unigendet.checkpoint.export import merge_lora_state
from unigendet.config.loader import ConfigError, from_dict
from unigendet.models.unigendet import UniGenDet
from unigendet.objectives import GDUFLossConfig, GDUFObjective, prepare_latents
from unigendet.training.freeze import FreezeConfig, LoRAConfig, apply_freeze, apply_lora, lora_target_regex

LAYERS = "language_model.model.layers."
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def names() -> list[str]:
    return [n for n, _ in UniGenDet(tiny_config()).named_parameters()]


def _model(seed: int = 0) -> UniGenDet:
    torch.manual_seed(seed)
    model = UniGenDet(tiny_config())
    # llm2vae is zero at fresh init, which would block every gradient into the gen expert.
    nn.init.normal_(model.llm2vae.weight, std=0.02)
    return model


def _frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _is_gen_expert(n: str) -> bool:
    return n.startswith("language_model.model.") and "_moe_gen" in n


def _is_und_expert(n: str) -> bool:
    # Every decoder weight without the gen suffix, plus the und final norm.
    return (n.startswith(LAYERS) or n.startswith("language_model.model.norm.")) and "_moe_gen" not in n


EXPECTED = {
    "vit": lambda n: n.startswith("vit_model."),
    "connector": lambda n: n.startswith("connector."),
    "und_expert": _is_und_expert,
    "gen_expert": lambda n: _is_gen_expert(n) or n.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae"),
    "embeddings": lambda n: n.startswith("language_model.model.embed_tokens."),
    "lm_head": lambda n: n.startswith("language_model.lm_head."),
    "detection_head": lambda n: n.startswith("detection_head."),
}


@pytest.mark.parametrize("flag", list(EXPECTED))
def test_each_freeze_flag_freezes_exactly_its_parameters(flag, names):
    model = UniGenDet(tiny_config())
    apply_freeze(model, FreezeConfig(**{flag: True}))
    expected = {n for n in names if EXPECTED[flag](n)}
    assert expected, flag
    assert _frozen(model) == expected


def test_und_and_gen_expert_split_the_decoder(names):
    und = UniGenDet(tiny_config())
    apply_freeze(und, FreezeConfig(und_expert=True))
    frozen = _frozen(und)
    for n in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.bias", "layers.1.mlp.gate_proj.weight",
              "layers.0.input_layernorm.weight", "layers.1.post_attention_layernorm.weight",
              "layers.0.self_attn.q_norm.weight", "layers.0.self_attn.o_proj.weight"):
        assert "language_model.model." + n in frozen, n
    assert "language_model.model.norm.weight" in frozen
    for n in ("language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
              "language_model.model.layers.0.mlp_moe_gen.gate_proj.weight",
              "language_model.model.layers.0.input_layernorm_moe_gen.weight",
              "language_model.model.layers.0.self_attn.k_norm_moe_gen.weight",
              "language_model.model.norm_moe_gen.weight", "language_model.model.embed_tokens.weight",
              "language_model.lm_head.weight", "time_embedder.mlp.0.weight", "vae2llm.weight"):
        assert n not in frozen, n

    gen = UniGenDet(tiny_config())
    apply_freeze(gen, FreezeConfig(gen_expert=True))
    gen_frozen = _frozen(gen)
    assert all("_moe_gen" in n for n in gen_frozen if n.startswith("language_model."))
    assert {"llm2vae.weight", "llm2vae.bias", "vae2llm.weight", "time_embedder.mlp.2.bias"} <= gen_frozen
    # The two experts partition the decoder (embeddings and lm_head belong to neither).
    decoder = {n for n in names if n.startswith(LAYERS) or n.startswith("language_model.model.norm")}
    assert frozen & gen_frozen == set()
    assert decoder <= frozen | gen_frozen


def test_freeze_combinations_and_everything():
    model = UniGenDet(tiny_config())
    apply_freeze(model, FreezeConfig())
    assert not _frozen(model)
    apply_freeze(model, FreezeConfig(vit=True, und_expert=True, embeddings=True, lm_head=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("_moe_gen" in n for n in trainable) and "connector.fc1.weight" in trainable
    assert "detection_head.1.weight" in trainable
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        apply_freeze(UniGenDet(tiny_config()), FreezeConfig(**{k: True for k in EXPECTED}))


# ---------------------------------------------------------------- LoRA


def _lora_modules(model) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _expected_lora(experts, targets) -> set[str]:
    out = set()
    for layer in range(tiny_config().llm.num_hidden_layers):
        for expert in experts:
            s = "_moe_gen" if expert == "gen" else ""
            for t in targets:
                if t in ("gate_proj", "up_proj", "down_proj"):
                    out.add(f"{LAYERS}{layer}.mlp{s}.{t}")
                else:
                    out.add(f"{LAYERS}{layer}.self_attn.{t}{s}")
    return out


@pytest.mark.parametrize(
    "experts,targets",
    [(["und", "gen"], ALL_TARGETS), (["gen"], ALL_TARGETS), (["und"], ["q_proj", "v_proj", "down_proj"]),
     (["gen"], ["o_proj", "up_proj"])],
)
def test_lora_adapters_only_on_chosen_experts_and_targets(experts, targets):
    cfg = LoRAConfig(enabled=True, r=4, alpha=8, experts=experts, targets=targets)
    model = apply_lora(UniGenDet(tiny_config()), cfg)
    assert _lora_modules(model) == _expected_lora(experts, targets)
    # No adapter anywhere else (SigLIP also has q/k/v projections; connector, heads).
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith(LAYERS) for n in lora_names)
    # Only adapter weights train.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_names)
    if experts == ["gen"]:
        layer = model.language_model.model.layers[0]
        for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert type(getattr(layer.self_attn, t)) is nn.Linear, t
        for t in ("gate_proj", "up_proj", "down_proj"):
            assert type(getattr(layer.mlp, t)) is nn.Linear, t
    assert re.fullmatch(lora_target_regex(cfg), "vit_model.vision_model.encoder.layers.0.self_attn.q_proj") is None


def test_lora_rejects_unknown_targets_when_the_config_loads():
    with pytest.raises(ConfigError, match="qkv_proj"):
        from_dict(LoRAConfig, {"enabled": True, "targets": ["q_proj", "qkv_proj"]})


class _StubVAE:
    """Deterministic stand-in for the FLUX VAE (a fixed pooling + channel mix): LoRA does not touch the
    VAE, and the real one costs seconds of import time."""

    def __init__(self, cfg):
        self.down = cfg.vae.downsample
        self.mix = torch.randn(cfg.vae.latent_channels, 3, generator=torch.Generator().manual_seed(0))

    def encode_list(self, images, generator=None):
        out = []
        for img in images:
            z = torch.einsum("ck,khw->chw", self.mix, nn.functional.avg_pool2d(img[None], self.down)[0])
            out.append(z + 0.1 * torch.randn(z.shape, generator=generator))
        return out


def _batch_and_latents(cfg, vae, gen, seed=0):
    from helpers import det_sample, t2i_sample

    batch = builder(cfg).build([det_sample(gen), t2i_sample(gen, (32, 48))])
    return batch, prepare_latents(batch, vae, cfg.latent_patch_size, torch.Generator().manual_seed(seed))


def test_lora_training_step_changes_only_adapters_and_merges_exactly(gen):
    cfg = tiny_config()
    torch.manual_seed(1)
    vae = _StubVAE(cfg)
    lora = LoRAConfig(enabled=True, r=4, alpha=8, experts=["und", "gen"], targets=ALL_TARGETS)
    model = apply_lora(_model(), lora)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    objective = GDUFObjective(GDUFLossConfig(), vae, cfg.latent_patch_size, cfg.detection_loss)
    batch, _ = _batch_and_latents(cfg, vae, gen)
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):  # step 2 also moves lora_A (its gradient is zero while B = 0)
        loss, _ = objective(model, batch, torch.Generator().manual_seed(step))
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        optim.step()
        optim.zero_grad(set_to_none=True)

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    # Both experts' adapters learnt something (the pack has und and gen tokens).
    assert any("_moe_gen" in k and "lora_B" in k for k in changed)
    assert any("_moe_gen" not in k and "lora_B" in k for k in changed)
    assert any("lora_A" in k for k in changed)

    merged = merge_lora_state(after, lora.alpha / lora.r)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = UniGenDet(tiny_config())
    plain.load_state_dict_strict(merged)
    plain.eval()
    model.eval()
    eval_batch, lat = _batch_and_latents(cfg, vae, torch.Generator().manual_seed(5), seed=3)
    with torch.no_grad():
        a = model(eval_batch, lat.tokens, lat.timesteps)
        b = plain(eval_batch, lat.tokens, lat.timesteps)
        base = _model()(eval_batch, lat.tokens, lat.timesteps)
    for x, y in ((a.hidden, b.hidden), (a.ce_logits, b.ce_logits), (a.velocity, b.velocity),
                 (a.det_logits, b.det_logits)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # ... and the adapters matter: the merged model differs from the base model.
    assert not torch.allclose(a.hidden, base.hidden, atol=1e-4)
