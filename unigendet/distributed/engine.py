"""DeepSpeed configuration from our TrainConfig, and engine construction."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from unigendet.config.loader import ConfigError

logger = logging.getLogger(__name__)


def generated_deepspeed_config(zero_stage: int, offload_optimizer: bool, offload_params: bool) -> dict[str, Any]:
    """The JSON shipped in configs/deepspeed/, built in code when no file is given."""
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e8}
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e5,
                    stage3_prefetch_bucket_size=5e8)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise ConfigError(f"deepspeed config: no value to fill 'auto' at {path}")
        return values[path]
    return node


def resolve_deepspeed_config(cfg, bf16: bool) -> dict[str, Any]:
    """Load the JSON (or generate it) and replace every "auto" by this run's value.

    ``cfg`` is the TrainConfig. Values are taken from our config so that there is one place to
    set each option; a literal value in the JSON that disagrees with our config is an error."""
    ds = cfg.deepspeed
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {err}") from err
    else:
        raw = generated_deepspeed_config(ds.zero_stage, ds.offload_optimizer, ds.offload_params)
    optim = cfg.optim
    values = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": optim.max_grad_norm,
        "bf16.enabled": bf16,
        "optimizer.params.lr": optim.lr,
        "optimizer.params.betas": list(optim.betas),
        "optimizer.params.eps": optim.eps,
        "optimizer.params.weight_decay": optim.weight_decay,
        "zero_optimization.stage": ds.zero_stage,
    }
    resolved = _fill_auto(copy.deepcopy(raw), values)
    stage = resolved.get("zero_optimization", {}).get("stage", 0)
    if ds.config_file and stage != ds.zero_stage:
        raise ConfigError(f"deepspeed.config_file sets ZeRO stage {stage} but deepspeed.zero_stage is {ds.zero_stage}")
    if resolved.get("train_micro_batch_size_per_gpu", 1) != 1:
        raise ConfigError("train_micro_batch_size_per_gpu must be 1: one packed sequence per micro-step")
    offloading = "offload_optimizer" in resolved.get("zero_optimization", {})
    # torch's AdamW on device; DeepSpeed's CPU Adam is required when the optimizer lives on the host.
    resolved.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = not offloading
    if offloading:
        resolved["optimizer"]["params"].pop("torch_adam")
    return resolved


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms, biases and embeddings-as-tables are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], lr_lambda, weight_decay: float):
    """``deepspeed.initialize`` with our parameter groups and LR schedule (a LambdaLR)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, weight_decay),
        config=ds_config,
        lr_scheduler=scheduler,
    )
    return engine, optimizer, lr_scheduler
