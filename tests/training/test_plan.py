"""``unigendet plan``: parameter counts, the activation probe against measured saved tensors, the ZeRO / offload
arithmetic, the verdict, the cache and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, tiny_config

from unigendet.cli import main
from unigendet.models.unigendet import UniGenDet
from unigendet.profiling import memory
from unigendet.profiling.memory import _SavedTensorMeter, probe_activations
from unigendet.profiling.random_packs import synthetic_pack
from unigendet.training.config import load_train_config
from unigendet.training.freeze import apply_lora
from unigendet.training.plan import ClusterSpec, PlanCommand, ProbeSettings, build_plan

DEMO = str(REPO / "configs" / "train" / "gduf_demo.yaml")


@pytest.fixture
def probe(tmp_path) -> ProbeSettings:
    return ProbeSettings(tokens=256, cache_dir=str(tmp_path / "cache"))


def plan_for(probe: ProbeSettings, overrides=(), **cluster):
    return build_plan(load_train_config(DEMO, list(overrides)), ClusterSpec(**cluster), probe)


def test_parameter_counts_equal_the_built_model_with_and_without_lora(probe):
    cfg = load_train_config(DEMO, ["lora.enabled=true", "lora.r=4"])
    real = UniGenDet(cfg.model)
    full = plan_for(probe, gpus_per_node=1)["parameters"]
    assert full["total"] == sum(p.numel() for p in real.parameters()) == full["trainable"]
    adapted = apply_lora(real, cfg.lora)
    lora = plan_for(probe, ["lora.enabled=true", "lora.r=4"], gpus_per_node=1)["parameters"]
    assert lora["total"] == sum(p.numel() for p in adapted.parameters())
    assert lora["trainable"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad) < full["total"] / 5


@pytest.mark.parametrize("layers, vit_layers", [(2, 2), (4, 3)])
def test_the_probe_predicts_what_a_full_forward_keeps(layers, vit_layers):
    """Per-token figures from 1-2 layer slices scale to deeper models and another pack size (within 3%)."""
    cfg = tiny_config()
    profile = probe_activations(cfg, tokens=256)
    deep = tiny_config(**{"llm.num_hidden_layers": layers, "vit.num_hidden_layers": vit_layers})
    torch.manual_seed(0)
    model = UniGenDet(deep).train()
    batch = synthetic_pack(deep, 900, 8 * cfg.latent_downsample)
    latents = torch.randn(batch.vae_token_indexes.numel(), deep.patch_latent_dim)
    for checkpointing in (False, True):
        model.set_activation_checkpointing(checkpointing)
        meter = _SavedTensorMeter(model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            model(batch, latent_tokens=latents, latent_timesteps=torch.rand(latents.shape[0]))
        measured = meter.float_elems * 4 + meter.int_bytes
        parts = profile.training_bytes(batch.sequence_length, int(batch.vit_tokens.shape[0]),
                                       int(batch.ce_loss_indexes.numel()), layers, vit_layers, 4, checkpointing)
        # The probe runs in fp32: its logits have no separate float32 copy, and the recomputed layer is a backward
        # transient the forward does not keep.
        kept = parts["total"] - parts["recomputed_layer"] - int(batch.ce_loss_indexes.numel()) * cfg.llm.vocab_size * 4
        assert kept == pytest.approx(measured, rel=0.03), checkpointing
    assert profile.checkpointed.layer < profile.plain.layer / 5


def test_zero3_partitions_offload_moves_to_the_host_and_the_verdict_follows_memory(probe):
    z2 = plan_for(probe, ["deepspeed.zero_stage=2"], gpus_per_node=8)
    z3 = plan_for(probe, ["deepspeed.zero_stage=3"], gpus_per_node=8)
    assert z3["per_gpu_gib"]["trainable_model_states"] < z2["per_gpu_gib"]["trainable_model_states"]
    z3_more = plan_for(probe, ["deepspeed.zero_stage=3"], gpus_per_node=8, nodes=4)
    assert z3_more["per_gpu_gib"]["trainable_model_states"] <= z3["per_gpu_gib"]["trainable_model_states"]
    offload = ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
               "lora.enabled=true", "lora.r=4"]
    lora = plan_for(probe, offload, gpus_per_node=1)
    assert lora["per_gpu_gib"]["frozen_weights"] == 0.0 and lora["per_host_gib"]["offloaded_frozen_weights"] > 0
    assert lora["per_host_gib"]["model_states"] > 0
    assert plan_for(probe, gpus_per_node=1, gpu_memory_gib=80)["fits_gpu"] is True
    assert plan_for(probe, gpus_per_node=1, gpu_memory_gib=1.0)["fits_gpu"] is False  # the 2 GiB allowance alone


def test_model_states_come_from_deepspeeds_estimator(probe):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = plan_for(probe, ["deepspeed.zero_stage=3"], gpus_per_node=4, nodes=2)
    params = plan["parameters"]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(params["trainable"], params["largest_tensor"], 4, 2,
                                                      cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert plan["per_gpu_gib"]["trainable_model_states"] == pytest.approx(gpu / 2**30)


def test_the_probe_runs_once_per_geometry(probe, monkeypatch):
    plan_for(probe, gpus_per_node=1)

    def no_probe(*args, **kwargs):
        raise AssertionError("the cached profile should have been used")

    monkeypatch.setattr(memory, "probe_activations", no_probe)
    monkeypatch.setattr("unigendet.training.plan.probe_activations", no_probe)
    assert "cached probe" in plan_for(probe, gpus_per_node=2)["how"]["activations"]


def test_the_plan_command_prints_a_table_or_json(tmp_path, capsys):
    common = ["plan", "--recipe", DEMO, "--gpus", "2", "--set", "lora.enabled=true", "lora.r=4",
              f"probe.cache_dir={tmp_path}", "--probe-tokens", "256"]
    assert main(common) == 0
    table = capsys.readouterr().out
    assert "memory plan: gduf on 1 x 2 GPUs" in table and "LoRA" in table and "verdict:" in table
    assert main([*common, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"]["lora"] is True and plan["cluster"]["gpus"] == 2
    assert main(["plan", "--recipe", DEMO, "--gpu", "tpu-v9"]) == 2
    assert "unknown card 'tpu-v9'" in capsys.readouterr().err
    assert main(["plan", "--recipe", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2


def test_a_probe_of_meta_free_shapes_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe_activations(tiny_config(), tokens=128)
    assert torch.equal(torch.rand(3), expected)
    assert PlanCommand(recipe=DEMO).cluster.gpus == 8
