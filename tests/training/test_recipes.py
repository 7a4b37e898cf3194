"""Every shipped config loads and validates; bad configs fail with errors naming the key."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from unigendet.config.loader import ConfigError, load_config
from unigendet.distributed.engine import lr_multiplier, resolve_deepspeed_config
from unigendet.models.config import ModelConfig
from unigendet.training.config import TrainConfig, load_train_config

TRAIN_YAMLS = sorted((REPO / "configs" / "train").glob("*.yaml"))
MODEL_YAMLS = sorted((REPO / "configs" / "model").glob("*.yaml"))
DS_JSONS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def test_there_are_recipes():
    assert TRAIN_YAMLS and MODEL_YAMLS and DS_JSONS


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.name)
def test_model_configs_load(path):
    load_config(ModelConfig, path)


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.name)
def test_train_configs_load_and_resolve_deepspeed(path):
    cfg = load_train_config(str(path))
    ds = resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=cfg.device == "cuda")
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_jsons_resolve(path):
    zero = json.loads(path.read_text())["zero_optimization"]
    cfg = load_config(TrainConfig, REPO / "configs/train/gduf_demo.yaml",
                      [f"deepspeed.config_file={path}", f"deepspeed.zero_stage={zero['stage']}",
                       f"deepspeed.offload_optimizer={'offload_optimizer' in zero}",
                       f"deepspeed.offload_params={'offload_param' in zero}"])
    resolved = resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=True)
    assert resolved["bf16"]["enabled"] is True
    assert resolved["gradient_clipping"] == cfg.optim.max_grad_norm


def test_bagel_recipe_uses_bagel_geometry():
    cfg = load_train_config(str(REPO / "configs/train/gduf_bagel7b.yaml"))
    assert cfg.model.llm == ModelConfig().llm and cfg.model.vit == ModelConfig().vit
    assert cfg.optim.lr == 2e-5 and cfg.gduf.det_weight == 0.2


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", "optim.lrr"),
    ("data.sources.fakeclue.kind=parquet", "data.sources.fakeclue.kind"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("model.llm.hidden_size=65", "hidden_size"),
    ("total_steps=0", "total_steps"),
    ("deepspeed.offload_params=true", "offload_params"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), [override])


@pytest.mark.parametrize("recipe, override, key", [
    ("diga_demo.yaml", "gduf.det_weight=1.0", "gduf.det_weight"),
    ("diga_bagel7b.yaml", "gduf.timestep_shift=3.0", "gduf.timestep_shift"),
    ("gduf_demo.yaml", "diga.align_weight=0.1", "diga.align_weight"),
    ("gduf_demo.yaml", "diga.teacher_layer=null", "diga.teacher_layer"),
])
def test_a_setting_the_stage_ignores_is_an_error_naming_the_key(recipe, override, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: stage '\w+' does not read"):
        load_train_config(str(REPO / "configs/train" / recipe), [override])


@pytest.mark.parametrize("override", ["loss.det_weight=0.2", "loss.mse_weight=1.0"])
def test_the_old_shared_loss_section_is_unknown(override):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) loss\b"):
        load_train_config(str(REPO / "configs/train/diga_demo.yaml"), [override])


def test_each_stage_reads_its_own_loss_settings():
    gduf = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), ["gduf.mse_weight=0.5"])
    diga = load_train_config(str(REPO / "configs/train/diga_demo.yaml"), ["diga.mse_weight=0.25",
                                                                           "diga.timestep_shift=2.0"])
    assert gduf.stage_config.mse_weight == 0.5 and gduf.stage_config.det_weight == 5.0
    assert diga.stage_config.mse_weight == 0.25 and diga.stage_config.timestep_shift == 2.0


def test_deepspeed_file_disagreeing_with_config_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}))
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), [f"deepspeed.config_file={path}"])
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=False)


def _ds_file(tmp_path, content: dict, overrides: list[str] = ()):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), [f"deepspeed.config_file={path}",
                                                                          *overrides])
    return cfg


@pytest.mark.parametrize("content, message", [
    ({"gradient_clipping": 0.5}, r"gradient_clipping = 0.5 but the run's config says 1.0 \(optim.max_grad_norm\)"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled = True but the run's config says False \(deepspeed.precision=auto\)"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps = 4 .* says 1"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, r"optimizer.params.lr = 1.0 .* \(optim.lr\)"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, r"optimizer.params.betas"),
    ({"optimizer": {"type": "SGD"}}, r"optimizer.type = 'SGD'"),
    ({"fp16": {"enabled": True}}, r"fp16.enabled"),
    ({"train_micro_batch_size_per_gpu": 2}, r"train_micro_batch_size_per_gpu = 2"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     r"sets zero_optimization.offload_optimizer but the run's config says deepspeed.offload_optimizer=false"),
    ({"scheduler": {"type": "WarmupLR"}}, r"scheduler section"),
    ({"train_batch_size": 3}, r"train_batch_size = 3 but 1 sequence x 1 accumulation steps x 2 ranks = 2"),
])
def test_every_literal_that_disagrees_with_the_config_is_an_error_naming_both(tmp_path, content, message):
    cfg = _ds_file(tmp_path, {"zero_optimization": {"stage": 2}, **content})
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=False, world_size=2)


def test_fields_the_file_leaves_out_or_marks_auto_come_from_the_config(tmp_path):
    cfg = _ds_file(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": "auto"},
                              "train_batch_size": "auto"},
                   ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.gradient_accumulation_steps=4",
                    "optim.max_grad_norm=0.5", "optim.lr=3e-4"])
    resolved = resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=True, world_size=8)
    assert resolved["gradient_clipping"] == 0.5 and resolved["gradient_accumulation_steps"] == 4
    assert resolved["bf16"]["enabled"] is True and resolved["optimizer"]["params"]["lr"] == 3e-4
    assert resolved["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in resolved["optimizer"]["params"] and "train_batch_size" not in resolved
    agreeing = _ds_file(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                                   "optimizer": {"type": "adamw", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
                                   "train_batch_size": 2})
    assert resolve_deepspeed_config(agreeing.deepspeed, agreeing.optim, bf16=False, world_size=2)["optimizer"][
        "params"]["torch_adam"] is True


def test_missing_deepspeed_file_is_an_error():
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), ["deepspeed.config_file=nope.json"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=False)


def test_lr_schedule_shapes():
    f = lr_multiplier(warmup_steps=4, total_steps=14, decay="cosine", min_lr_ratio=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    g = lr_multiplier(0, 10, "linear", 0.0)
    assert g(5) == pytest.approx(0.5) and g(10) == 0.0
    assert lr_multiplier(3, 10, "constant", 0.0)(100) == 1.0


@pytest.mark.parametrize("setting, key", [({"bf16": {"enabled": "auto", "check_grad_overflow": False}},
                                           "bf16.check_grad_overflow"),
                                          ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}},
                                           "compute_grad_norm")])
def test_deepspeed_file_may_not_turn_off_the_overflow_skip(tmp_path, setting, key):
    """The non-finite guard relies on DeepSpeed skipping steps whose gradient norm is not finite."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, **setting}))
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), [f"deepspeed.config_file={path}"])
    with pytest.raises(ConfigError, match=key.replace(".", "[.]")):
        resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=True)
    if "bf16" not in setting:
        return
    setting["bf16"].pop("check_grad_overflow")
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, **setting}))
    assert resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16=True)["bf16"]["check_grad_overflow"] is True


def test_checkpoint_granularity_needs_checkpointing_and_a_packed_stage():
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"),
                            ["activation_checkpointing=true", "checkpoint_granularity=sublayer"])
    assert cfg.checkpoint_granularity == "sublayer"
    with pytest.raises(ConfigError, match="checkpoint_granularity: 'sublayer' applies only with activation_check"):
        load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), ["checkpoint_granularity=sublayer"])
    with pytest.raises(ConfigError, match="checkpoint_granularity"):
        load_train_config(str(REPO / "configs/train/ltd_tiny.yaml"), ["checkpoint_granularity=sublayer"])


def test_vae_posterior_cache_is_validated_and_read_by_packed_stages_only():
    assert load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), []).vae_posterior_cache == 4096
    assert load_train_config(str(REPO / "configs/train/diga_demo.yaml"),
                             ["vae_posterior_cache=0"]).vae_posterior_cache == 0
    with pytest.raises(ConfigError, match="vae_posterior_cache"):
        load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), ["vae_posterior_cache=-1"])
    with pytest.raises(ConfigError, match="vae_posterior_cache"):
        load_train_config(str(REPO / "configs/train/ltd_tiny.yaml"), ["vae_posterior_cache=8"])
