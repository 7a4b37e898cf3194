"""The DeepSpeed engine: model + AdamW + learning-rate schedule, from ``DeepSpeedConfig`` and ``OptimConfig``.

DeepSpeed is imported inside ``build_engine`` only, so the configs resolve without it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_positive, require_probability, require_range

logger = logging.getLogger(__name__)


@dataclass
class DeepSpeedConfig:
    """Our view of the DeepSpeed engine. ``config_file`` (a JSON under configs/deepspeed/) may hold
    "auto" fields, filled from this run's config; without it one is generated from ``zero_stage``."""

    config_file: str | None = None
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_accumulation_steps: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    def validate(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params needs zero_stage 3")
        require_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)

    def use_bf16(self, device_type: str) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant / cosine / linear decay. Reference: lr 2e-5,
    betas (0.9, 0.95), eps 1e-15, weight decay 0 (the paper says non-zero; value lost), clip 1.0.
    ``max_grad_norm``: clip the global gradient norm to this value; 0 turns clipping off."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 50
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    # Learning-rate multipliers by module: {"detection_head": 0.1} trains every parameter under a module named
    # ``detection_head`` (at any depth, so also inside a LoRA wrapper) at 0.1 x ``lr``, on the same schedule.
    # The longest matching module path wins; the rest train at ``lr``.
    lr_scale: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        require_positive("lr", self.lr)
        for module, scale in self.lr_scale.items():
            if not module or module.startswith(".") or module.endswith("."):
                raise ConfigError(f"optim.lr_scale: {module!r} is not a module path (e.g. 'detection_head')")
            require_positive(f"lr_scale.{module}", scale)
        for i, beta in enumerate(self.betas):
            require_probability(f"betas[{i}]", beta, one_allowed=False)
        require_positive("eps", self.eps)
        require_non_negative("weight_decay", self.weight_decay)
        require_non_negative("warmup_steps", self.warmup_steps)
        require_probability("min_lr_ratio", self.min_lr_ratio)
        require_non_negative("max_grad_norm", self.max_grad_norm)


def lr_multiplier(warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> Callable[[int], float]:
    """LambdaLR factor for optimizer step ``step`` (0-based: the first step uses factor(0)): linear
    warm-up, then constant, cosine or linear decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if decay == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif decay == "linear":
            shape = 1.0 - progress
        else:
            raise ValueError(f"unknown decay {decay!r}")
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


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


def _controlled_fields(ds: DeepSpeedConfig, optim: OptimConfig, bf16: bool) -> dict[str, tuple[Any, str]]:
    """Every JSON field this run's config decides: dotted path -> (value, the config key that sets it)."""
    return {
        "train_micro_batch_size_per_gpu": (1, "fixed: one packed sequence per micro-step"),
        "gradient_accumulation_steps": (ds.gradient_accumulation_steps, "deepspeed.gradient_accumulation_steps"),
        "gradient_clipping": (optim.max_grad_norm, "optim.max_grad_norm"),
        "bf16.enabled": (bf16, f"deepspeed.precision={ds.precision}"),
        "fp16.enabled": (False, "fixed: fp16 is not supported, use deepspeed.precision bf16"),
        "optimizer.type": ("AdamW", "fixed: AdamW"),
        "optimizer.params.lr": (optim.lr, "optim.lr"),
        "optimizer.params.betas": (list(optim.betas), "optim.betas"),
        "optimizer.params.eps": (optim.eps, "optim.eps"),
        "optimizer.params.weight_decay": (optim.weight_decay, "optim.weight_decay"),
        "zero_optimization.stage": (ds.zero_stage, "deepspeed.zero_stage"),
    }


def _same(file_value: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(file_value, bool):
        return file_value is ours
    if isinstance(ours, (int, float)) and isinstance(file_value, (int, float)):
        return math.isclose(float(file_value), float(ours), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(ours, list) and isinstance(file_value, (list, tuple)):
        return len(ours) == len(file_value) and all(_same(a, b) for a, b in zip(file_value, ours))
    if isinstance(ours, str) and isinstance(file_value, str):
        return file_value.lower() == ours.lower()
    return file_value == ours


def _get(tree: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _apply_controlled_fields(resolved: dict[str, Any], controlled: dict[str, tuple[Any, str]], where: str) -> None:
    """Fill every controlled field the file leaves out; a literal that disagrees is a ConfigError naming both."""
    for path, (ours, key) in controlled.items():
        present, value = _get(resolved, path)
        if not present:
            _set(resolved, path, ours)
        elif not _same(value, ours):
            raise ConfigError(f"{where} sets {path} = {value!r} but the run's config says {ours!r} ({key}); "
                              f"write \"auto\" in the file or change {key.split('=')[0]}")


def _offloads(zero: dict[str, Any], section: str) -> bool:
    value = zero.get(section)
    return isinstance(value, dict) and str(value.get("device", "none")).lower() not in ("none", "")


def _apply_offload(resolved: dict[str, Any], ds: DeepSpeedConfig, where: str) -> None:
    """Offload sections: "auto" (or absent) follows the config; a file that offloads differently is an error."""
    zero = resolved.setdefault("zero_optimization", {})
    for section, ours, key in (("offload_optimizer", ds.offload_optimizer, "deepspeed.offload_optimizer"),
                               ("offload_param", ds.offload_params, "deepspeed.offload_params")):
        if zero.get(section) in (None, "auto"):
            zero.pop(section, None)
            if ours:
                zero[section] = {"device": "cpu", "pin_memory": True}
            continue
        if _offloads(zero, section) != ours:
            raise ConfigError(f"{where} {'sets' if _offloads(zero, section) else 'turns off'} "
                              f"zero_optimization.{section} but the run's config says {key}={str(ours).lower()}")


def _check_batch_size(resolved: dict[str, Any], ds: DeepSpeedConfig, world_size: int | None, where: str) -> None:
    """``train_batch_size`` is micro-batch (1) x accumulation x ranks: "auto" is dropped (DeepSpeed derives it)."""
    if resolved.get("train_batch_size") == "auto":
        resolved.pop("train_batch_size")
    if "train_batch_size" not in resolved or world_size is None:
        return
    expected = ds.gradient_accumulation_steps * world_size
    if resolved["train_batch_size"] != expected:
        raise ConfigError(f"{where} sets train_batch_size = {resolved['train_batch_size']!r} but 1 sequence x "
                          f"{ds.gradient_accumulation_steps} accumulation steps x {world_size} ranks = {expected} "
                          "(write \"auto\" or remove it)")


def resolve_deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, bf16: bool,
                             world_size: int | None = None) -> dict[str, Any]:
    """Load the JSON (or generate it) and make it agree with this run's config.

    One place sets each option: every field our configs decide (precision, clipping, accumulation, the
    optimizer and its lr/betas/eps/weight decay, the ZeRO stage, offload, the micro-batch) is filled where the
    file says "auto" or leaves it out, and a literal that disagrees is a ConfigError naming both values. The
    learning-rate schedule is ours (``optim.warmup_steps``/``decay``): a ``scheduler`` section is an error."""
    where = "deepspeed config"
    if ds.config_file:
        path = Path(ds.config_file)
        where = f"deepspeed.config_file {path}"
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    else:
        raw = generated_deepspeed_config(ds.zero_stage, ds.offload_optimizer, ds.offload_params)
    controlled = _controlled_fields(ds, optim, bf16)
    raw = copy.deepcopy(raw)
    _apply_offload(raw, ds, where)
    _check_batch_size(raw, ds, world_size, where)
    resolved = _fill_auto(raw, {path: value for path, (value, _) in controlled.items()})
    if "scheduler" in resolved:
        raise ConfigError(f"{where} has a scheduler section; the schedule is set by optim.warmup_steps, optim.decay "
                          "and optim.min_lr_ratio (remove the section)")
    stage = _get(resolved, "zero_optimization.stage")[1]
    if stage is not None and stage != ds.zero_stage:
        raise ConfigError(f"{where} sets ZeRO stage {stage} but deepspeed.zero_stage is {ds.zero_stage}")
    _apply_controlled_fields(resolved, controlled, where)
    offloading = _offloads(resolved["zero_optimization"], "offload_optimizer")
    # torch's AdamW on device; DeepSpeed's CPU Adam is required when the optimizer lives on the host.
    if offloading:
        resolved["optimizer"]["params"].pop("torch_adam", None)
    else:
        resolved["optimizer"]["params"].setdefault("torch_adam", True)
    _keep_overflow_checks(resolved)
    return resolved


def _keep_overflow_checks(resolved: dict[str, Any]) -> None:
    """The trainer's guard relies on DeepSpeed skipping a step whose gradient norm is NaN/inf. Under bf16
    it does only with ``bf16.check_grad_overflow``, and never without the gradient norm: a file may not
    turn either off."""
    bf16 = resolved.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled"):
        if bf16.get("check_grad_overflow") is False:
            raise ConfigError("deepspeed.config_file sets bf16.check_grad_overflow false: the trainer's non-finite "
                              "gradient guard needs it (remove the setting)")
        bf16["check_grad_overflow"] = True
    if resolved.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ConfigError("deepspeed.config_file sets zero_optimization.compute_grad_norm false: the trainer's "
                          "non-finite gradient guard needs the gradient norm (remove the setting)")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 lr_scale: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Decay matrices only; norms, biases and embeddings-as-tables are not decayed. ``lr_scale`` (module path ->
    multiplier, see ``OptimConfig.lr_scale``) puts the matching parameters in groups of their own at ``scale * lr``;
    a module path the model does not have is an error, one whose parameters are all frozen is skipped. A model with
    an ``optimizer_param_groups(weight_decay)`` method that returns groups (each with its own ``lr``) uses those."""
    custom = getattr(model, "optimizer_param_groups", None)
    groups = custom(weight_decay) if callable(custom) else None
    if groups is not None:
        if lr_scale:
            raise ConfigError(f"optim.lr_scale {sorted(lr_scale)}: this model sets its own per-module learning rates "
                              "(its config's lr fields); remove optim.lr_scale")
        return groups
    lr_scale = lr_scale or {}
    if lr_scale and lr is None:
        raise ValueError("param_groups: lr_scale needs the base lr")
    by_key: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    present: set[str] = set()
    trained: set[str] = set()
    for name, p in model.named_parameters():
        module = _scaled_module(name, lr_scale)
        if module is not None:
            present.add(module)
        if not p.requires_grad:
            continue
        if module is not None:
            trained.add(module)
        # A parameter built under deepspeed.zero.Init holds an empty placeholder; ds_shape is its real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        scale = lr_scale[module] if module is not None else 1.0
        by_key.setdefault((ndim >= 2 and "embed_tokens" not in name, scale), []).append(p)
    missing = sorted(set(lr_scale) - present)
    if missing:
        raise ConfigError(f"optim.lr_scale: this model has no module {missing} (misspelt, or not part of this model)")
    if present - trained:
        # A recipe that freezes a module (DIGA freezes the detection head) may inherit its base recipe's scales.
        logger.info("optim.lr_scale: %s frozen in this run; their scale does not apply", sorted(present - trained))
    # Decayed groups first, each kind's unscaled group before its scaled ones: without scales, the order (and so a
    # checkpoint's optimizer state) is the same as before scales existed.
    groups = []
    for (decayed, scale), params in sorted(by_key.items(), key=lambda kv: (not kv[0][0], kv[0][1] != 1.0, kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if lr_scale:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


def _scaled_module(name: str, lr_scale: dict[str, float]) -> str | None:
    """The longest module path of ``lr_scale`` that parameter ``name`` lies under (at any depth), or None."""
    dotted = "." + name
    hits = [m for m in lr_scale if ("." + m + ".") in dotted]
    return max(hits, key=len) if hits else None


def build_engine(model: torch.nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, total_steps: int, bf16: bool):
    """``deepspeed.initialize`` with our parameter groups and LR schedule (a LambdaLR over
    ``total_steps`` optimizer steps); returns (engine, optimizer, scheduler)."""
    import deepspeed

    lr_lambda = lr_multiplier(optim.warmup_steps, total_steps, optim.decay, optim.min_lr_ratio)

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, optim.weight_decay, optim.lr, optim.lr_scale),
        config=resolve_deepspeed_config(ds, optim, bf16, world_size=world_size),
        lr_scheduler=scheduler,
    )
    return engine, optimizer, lr_scheduler


class StepGate:
    """Runs DeepSpeed's optimizer step, or skips it: the trainer's guard decides, every rank alike.

    A skipped step leaves parameters and optimizer state untouched and the learning-rate schedule one step
    further on, exactly as an applied one would: the schedule position always equals the step count.

    * DeepSpeed itself skips a step whose global gradient norm is NaN/inf (ZeRO-1/2/3, and the bf16
      optimizer; ``resolve_deepspeed_config`` keeps that check on) but then leaves the schedule where it
      was, so the gate steps the schedule.
    * A skip the guard asks for (a non-finite loss on some rank) runs DeepSpeed's step with the gradients
      hidden from the inner optimizer (AdamW and DeepSpeed's CPU Adam leave a parameter without a gradient
      and its state alone); they are put back afterwards, so DeepSpeed's buffers stay as it keeps them.
    * fp32 without ZeRO steps a plain torch optimizer that checks nothing: ``local_nonfinite_gradients``
      gives the guard that check (the gradients are already averaged over ranks then).
    """

    def __init__(self, engine):
        self.engine = engine
        self.hiding = False
        self._hidden: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        inner = getattr(engine, "basic_optimizer", None) or engine.optimizer
        inner.register_step_pre_hook(self._hide_gradients)
        inner.register_step_post_hook(self._restore_gradients)
        self.engine_checks_gradients = hasattr(engine.optimizer, "overflow")

    def _hide_gradients(self, optimizer, args, kwargs) -> None:
        if not self.hiding:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._hidden.append((p, p.grad))
                p.grad = None

    def _restore_gradients(self, optimizer, args, kwargs) -> None:
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden.clear()

    def local_nonfinite_gradients(self) -> torch.Tensor:
        """1.0 where DeepSpeed will not check the gradients itself and this rank's are not finite, else 0.0
        (a tensor: no host sync)."""
        device = next(self.engine.module.parameters()).device
        if self.engine_checks_gradients:
            return torch.zeros((), device=device)
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        return (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()

    def step(self, skip: bool) -> bool:
        """DeepSpeed's step at an accumulation boundary, skipped when ``skip``; returns whether it was applied."""
        self.hiding = skip
        try:
            self.engine.step()
        finally:
            self.hiding = False
        if not self.engine.was_step_applied():
            # DeepSpeed's overflow skip does not advance the schedule; every other step does.
            self.engine.lr_scheduler.step()
            return False
        return not skip
