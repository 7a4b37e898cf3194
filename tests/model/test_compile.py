"""``compile: layer``: the compiled decoder layers give the eager losses and gradients (with and without activation
checkpointing), and a bad value is a config error."""

import copy

import pytest
import torch
from helpers import builder, tiny_config
from torch._dynamo.utils import counters

from unigendet.config.loader import ConfigError
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import prepare_latents


def _loss_and_grads(model, batch, lat):
    model.zero_grad(set_to_none=True)
    out = model(batch, lat.tokens, lat.timesteps)
    loss = out.ce_logits.logsumexp(-1).mean() + out.velocity.pow(2).mean() + out.det_logits.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_layers_equal_eager(mixed_samples):
    cfg = tiny_config()
    torch.manual_seed(0)
    eager = UniGenDet(cfg).train()
    torch.nn.init.normal_(eager.llm2vae.weight, std=0.02)
    compiled = copy.deepcopy(eager)
    compiled.language_model.model.set_compile("layer")
    batch = builder(cfg).build(mixed_samples)
    counters["stats"].clear()
    lat = prepare_latents(batch, FluxVAE(cfg.vae), cfg.latent_patch_size, torch.Generator().manual_seed(0))
    for granularity in (None, "layer", "sublayer", "nested"):
        for model in (eager, compiled):
            model.set_activation_checkpointing(granularity is not None, granularity or "layer")
        loss_e, grads_e = _loss_and_grads(eager, batch, lat)
        loss_c, grads_c = _loss_and_grads(compiled, batch, lat)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-4, msg=f"{granularity}: {name}")
    assert counters["stats"]["unique_graphs"] > 0  # the compiled path really ran through dynamo


def test_compile_setting_is_validated():
    cfg = tiny_config()
    cfg.compile = "everything"
    with pytest.raises(ConfigError, match="compile"):
        cfg.validate()
    with pytest.raises(ValueError, match="compile must be one of"):
        UniGenDet(tiny_config()).language_model.model.set_compile("graph")
