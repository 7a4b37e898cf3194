"""``unigendet plan``: will a training recipe fit, per GPU and per host, before anything is launched?

For a recipe (any ``configs/train/*.yaml`` plus overrides) and a cluster shape (GPUs per node, nodes, GPU memory)
the plan prints, per GPU and per host:

* **model states** of the trainable parameters from DeepSpeed's own estimators (``estimate_zero2_...`` /
  ``estimate_zero3_model_states_mem_needs``: bf16 weights and gradients, fp32 master weights and Adam moments,
  partitioned as the ZeRO stage and offload settings say), plus the frozen weights the estimators do not cover
  (base weights under LoRA or freezing, in bf16: replicated below ZeRO-3, partitioned or offloaded under it), the
  sharded fp32 EMA, the frozen FLUX VAE and, for DIGA, the frozen teacher;
* **activations** of one pack of ``data.packing.max_num_tokens`` tokens, with and without activation
  checkpointing, from a layer-level probe at the model's full width (:mod:`unigendet.profiling.memory`; the
  per-token figures are cached on disk by geometry, so only the first plan of a geometry runs the probe);
* **disk**: a DeepSpeed checkpoint, the EMA shards and the exports;
* a verdict: the per-GPU total, with a stated allowance for the CUDA context, communication buffers and allocator
  fragmentation, against the GPU's memory (and the host total against ``host_memory_gib`` when given).

Parameter counts come from the model built on the meta device (no memory), after the recipe's freezing and LoRA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unigendet.config.loader import ConfigError, from_dict, to_dict
from unigendet.models.config import ModelConfig
from unigendet.models.vae import FluxVAE
from unigendet.profiling.memory import (
    GIB,
    ActivationProfile,
    ParamCounts,
    SavedPerToken,
    count_parameters,
    meta_model,
    pack_composition,
    probe_activations,
)
from unigendet.training.config import TrainConfig, load_train_config
from unigendet.training.freeze import apply_freeze, apply_lora

logger = logging.getLogger(__name__)

# Usable memory of common training GPUs, GiB (the marketing "80 GB" of an A100 is 80 GiB of HBM).
GPU_MEMORY_GIB = {"a100-40gb": 40.0, "a100-80gb": 80.0, "h100-80gb": 80.0, "h100-94gb": 94.0, "h200": 141.0,
                  "l40s": 48.0, "a6000": 48.0, "rtx4090": 24.0}
# Per-GPU allowance beyond tensors: CUDA context and kernels, NCCL buffers, and the caching allocator's
# fragmentation (a share of what is allocated).
CONTEXT_GIB = 2.0
FRAGMENTATION = 0.10


@dataclass
class ClusterSpec:
    """The cluster the recipe is planned for: ``gpu`` names a card (:data:`GPU_MEMORY_GIB`) unless
    ``gpu_memory_gib`` gives the memory directly; ``host_memory_gib``: each node's RAM (optional check)."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu: str = "a100-80gb"
    gpu_memory_gib: float | None = None
    host_memory_gib: float | None = None

    def validate(self) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ConfigError("gpus_per_node and nodes must be >= 1")
        if self.gpu_memory_gib is None and self.gpu not in GPU_MEMORY_GIB:
            raise ConfigError(f"gpu: unknown card {self.gpu!r}; known: {', '.join(sorted(GPU_MEMORY_GIB))} "
                              "(or set gpu_memory_gib)")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError("gpu_memory_gib must be > 0")

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def memory_gib(self) -> float:
        return self.gpu_memory_gib if self.gpu_memory_gib is not None else GPU_MEMORY_GIB[self.gpu]


@dataclass
class ProbeSettings:
    """The activation probe: pack size and image side of the probe's forwards; ``cache_dir`` keeps the
    per-token figures by model geometry (default ``$XDG_CACHE_HOME/unigendet/activation_profiles``)."""

    tokens: int = 512
    image_size: int | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        if self.tokens < 64:
            raise ConfigError(f"tokens must be >= 64, got {self.tokens}")


@dataclass
class PlanCommand:
    """``unigendet plan --recipe RECIPE [--set KEY=VALUE ...] [--gpus N --nodes M --gpu NAME]``."""

    recipe: str
    set: list[str] = field(default_factory=list)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    json: bool = False

    def check_inputs(self) -> None:
        if not Path(self.recipe).is_file():
            raise ConfigError(f"recipe: {self.recipe} not found")
        self.train_config()

    def train_config(self) -> TrainConfig:
        cfg = load_train_config(self.recipe, list(self.set))
        if cfg.stage == "detector":
            raise ConfigError("recipe: plan covers the gduf and diga stages (baseline detectors are small)")
        return cfg


# --------------------------------------------------------------------------------------------------
# Parameters


def trainable_counts(cfg: TrainConfig) -> ParamCounts:
    """Counts of the model after the recipe's freezing and LoRA, built on the meta device."""
    model = meta_model(cfg.model)
    apply_freeze(model, cfg.freeze)
    if cfg.lora.enabled:
        with torch.device("meta"):
            model = apply_lora(model, cfg.lora)
    return count_parameters(model)


def frozen_extras(cfg: TrainConfig) -> dict[str, int]:
    """Parameter counts of the frozen modules every rank holds besides the trained model: the VAE and, for DIGA,
    the teacher (the stage-1 model truncated to ``diga.teacher_layer`` decoder layers)."""
    with torch.device("meta"):
        extras = {"vae": sum(p.numel() for p in FluxVAE(cfg.model.vae).parameters())}
    if cfg.stage == "diga":
        teacher = to_dict(cfg.model)
        if cfg.diga.teacher_layer is not None:
            teacher["llm"]["num_hidden_layers"] = cfg.diga.teacher_layer
        extras["diga_teacher"] = count_parameters(meta_model(from_dict(ModelConfig, teacher))).total
    return extras


# --------------------------------------------------------------------------------------------------
# Model states


def trainable_states(counts: ParamCounts, cfg: TrainConfig, cluster: ClusterSpec) -> tuple[float, float, str]:
    """(bytes per GPU, bytes per host, how) of the trainable parameters' model states, from DeepSpeed."""
    # DeepSpeed announces its accelerator on stdout when first imported; stdout carries the plan (--json).
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds = cfg.deepspeed
    trainable = counts.trainable
    if ds.zero_stage == 3:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, counts.largest_tensor, cluster.gpus_per_node, cluster.nodes, cpu_offload=ds.offload_optimizer,
            cpu_offload_params=ds.offload_params, zero_init=True)
        return float(gpu), float(host), "DeepSpeed estimate_zero3_model_states_mem_needs"
    if ds.zero_stage in (1, 2):
        host, gpu = estimate_zero2_model_states_mem_needs(trainable, cluster.gpus_per_node, cluster.nodes,
                                                          cpu_offload=ds.offload_optimizer)
        return float(gpu), float(host), "DeepSpeed estimate_zero2_model_states_mem_needs (ZeRO-1 and -2 alike)"
    # No partitioning: bf16 weights and gradients plus fp32 master weights, gradients and two Adam moments.
    return 20.0 * trainable, 0.0, "no ZeRO: 20 bytes per trainable parameter on every GPU"


def frozen_weight_bytes(frozen: int, cfg: TrainConfig, cluster: ClusterSpec, dtype_bytes: int) -> tuple[float, float]:
    """(per GPU, per host) bytes of the frozen part of the trained model (bf16 weights, no optimizer state)."""
    ds = cfg.deepspeed
    if ds.zero_stage < 3:
        return float(frozen * dtype_bytes), 0.0
    shard = frozen * dtype_bytes / cluster.gpus
    if ds.offload_params:
        return 0.0, shard * cluster.gpus_per_node
    return shard, 0.0


# --------------------------------------------------------------------------------------------------
# Activations


def _profile_cache_path(cfg: TrainConfig, probe: ProbeSettings) -> Path:
    root = Path(probe.cache_dir) if probe.cache_dir else (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unigendet" / "activation_profiles")
    geometry = {"llm": to_dict(cfg.model.llm), "vit": to_dict(cfg.model.vit), "vae": to_dict(cfg.model.vae),
                "latent_patch_size": cfg.model.latent_patch_size, "probe": asdict(probe) | {"cache_dir": None},
                "version": 1}
    digest = hashlib.blake2b(json.dumps(geometry, sort_keys=True).encode(), digest_size=12).hexdigest()
    return root / f"{digest}.json"


def activation_profile(cfg: TrainConfig, probe: ProbeSettings) -> tuple[ActivationProfile, str]:
    """The model's per-token activation profile: from the cache, else probed (and cached)."""
    path = _profile_cache_path(cfg, probe)
    if path.is_file():
        data = json.loads(path.read_text())
        data["plain"] = SavedPerToken(**data["plain"])
        data["checkpointed"] = SavedPerToken(**data["checkpointed"])
        return ActivationProfile(**data), f"cached probe ({path})"
    logger.info("probing activations of one- and two-layer slices at full width (once per geometry) ...")
    profile = probe_activations(cfg.model, tokens=probe.tokens, image_size=probe.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=1))
    return profile, f"probe of {profile.probe_llm_tokens} tokens, written to {path}"


# --------------------------------------------------------------------------------------------------
# The plan


def _gib(value: float) -> float:
    return value / GIB


def build_plan(cfg: TrainConfig, cluster: ClusterSpec, probe: ProbeSettings) -> dict[str, Any]:
    """Every figure of the plan (GiB, per GPU and per host) and the verdict."""
    dtype_bytes = 2 if cfg.use_bf16("cuda") else 4
    counts = trainable_counts(cfg)
    extras = frozen_extras(cfg)
    states_gpu, states_host, states_how = trainable_states(counts, cfg, cluster)
    frozen_gpu, frozen_host = frozen_weight_bytes(counts.frozen, cfg, cluster, dtype_bytes)
    ema_gpu = 4.0 * counts.trainable / cluster.gpus if cfg.ema.enabled else 0.0
    extras_gpu = float(sum(extras.values()) * dtype_bytes)

    profile, probe_how = activation_profile(cfg, probe)
    tokens = cfg.data.packing.max_num_tokens
    stride = cfg.model.latent_downsample
    side = min(cfg.data.vae_transform.max_size, cfg.data.vit_transform.max_size) // stride * stride
    share = pack_composition(cfg.model, tokens, side)
    shape = dict(llm_tokens=tokens, vit_tokens=int(tokens * share["vit_share"]),
                 ce_tokens=int(tokens * share["ce_share"]), layers=cfg.model.llm.num_hidden_layers,
                 vit_layers=cfg.model.vit.num_hidden_layers, dtype_bytes=dtype_bytes)
    activations = {flag: profile.training_bytes(**shape, checkpointing=flag) for flag in (False, True)}
    used = activations[cfg.activation_checkpointing]["total"]

    tensors = states_gpu + frozen_gpu + ema_gpu + extras_gpu + used
    per_gpu = tensors * (1 + FRAGMENTATION) + CONTEXT_GIB * GIB
    per_host = states_host + frozen_host
    checkpoint_bytes = dtype_bytes * counts.total + 12.0 * counts.trainable
    plan = {
        "recipe": {"stage": cfg.stage, "zero_stage": cfg.deepspeed.zero_stage,
                   "offload_optimizer": cfg.deepspeed.offload_optimizer, "offload_params": cfg.deepspeed.offload_params,
                   "lora": cfg.lora.enabled, "ema": cfg.ema.enabled,
                   "activation_checkpointing": cfg.activation_checkpointing, "pack_tokens": tokens,
                   "dtype": "bf16" if dtype_bytes == 2 else "fp32"},
        "cluster": {**asdict(cluster), "gpus": cluster.gpus, "gpu_memory_gib": cluster.memory_gib},
        "parameters": {"total": counts.total, "trainable": counts.trainable, "frozen": counts.frozen,
                       "largest_tensor": counts.largest_tensor, **{f"frozen_{k}": v for k, v in extras.items()}},
        "per_gpu_gib": {
            "trainable_model_states": _gib(states_gpu), "frozen_weights": _gib(frozen_gpu), "ema": _gib(ema_gpu),
            "vae_and_teacher": _gib(extras_gpu),
            "activations_without_checkpointing": _gib(activations[False]["total"]),
            "activations_with_checkpointing": _gib(activations[True]["total"]),
            "activations_used": _gib(used),
            "allowance": _gib(per_gpu - tensors), "total": _gib(per_gpu),
        },
        "activation_parts_gib": {("checkpointed" if flag else "plain"): {k: _gib(v) for k, v in parts.items()}
                                 for flag, parts in activations.items()},
        "per_host_gib": {"model_states": _gib(states_host), "offloaded_frozen_weights": _gib(frozen_host),
                         "total": _gib(per_host)},
        "disk_gib": {"deepspeed_checkpoint": _gib(checkpoint_bytes),
                     "ema_shards": _gib(4.0 * counts.trainable) if cfg.ema.enabled else 0.0,
                     "export_bf16": _gib(2.0 * counts.total), "export_fp32": _gib(4.0 * counts.total)},
        "how": {"model_states": states_how, "activations": probe_how,
                "allowance": f"{CONTEXT_GIB:g} GiB CUDA context and buffers + {FRAGMENTATION:.0%} fragmentation",
                "pack_composition": {k: round(v, 3) for k, v in share.items()}},
    }
    plan["fits_gpu"] = per_gpu <= cluster.memory_gib * GIB
    if cluster.host_memory_gib is not None:
        plan["fits_host"] = per_host <= cluster.host_memory_gib * GIB
    return plan


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a readable table."""
    r, c, params = plan["recipe"], plan["cluster"], plan["parameters"]
    lines = [f"memory plan: {r['stage']} on {c['nodes']} x {c['gpus_per_node']} GPUs of {c['gpu_memory_gib']:g} GiB, "
             f"ZeRO-{r['zero_stage']}{', optimizer offload' if r['offload_optimizer'] else ''}"
             f"{', parameter offload' if r['offload_params'] else ''}{', LoRA' if r['lora'] else ''}"
             f"{', EMA' if r['ema'] else ''}, {r['dtype']}, packs of {r['pack_tokens']} tokens, activation "
             f"checkpointing {'on' if r['activation_checkpointing'] else 'off'}",
             f"parameters: {params['total'] / 1e9:.3f} B, trainable {params['trainable'] / 1e9:.3f} B",
             "", f"{'per GPU':<40} {'GiB':>9}"]
    lines += [f"  {k:<38} {v:>9.2f}" for k, v in plan["per_gpu_gib"].items()]
    lines += ["", f"{'per host':<40} {'GiB':>9}"]
    lines += [f"  {k:<38} {v:>9.2f}" for k, v in plan["per_host_gib"].items()]
    lines += ["", f"{'on disk':<40} {'GiB':>9}"]
    lines += [f"  {k:<38} {v:>9.2f}" for k, v in plan["disk_gib"].items()]
    verdict = "fits" if plan["fits_gpu"] else "does NOT fit"
    lines += ["", f"verdict: {plan['per_gpu_gib']['total']:.1f} GiB per GPU {verdict} in {c['gpu_memory_gib']:g} GiB"]
    if "fits_host" in plan:
        lines.append(f"host: {plan['per_host_gib']['total']:.1f} GiB {'fits' if plan['fits_host'] else 'does NOT fit'}"
                     f" in {c['host_memory_gib']:g} GiB")
    lines += [f"({k}: {v})" for k, v in plan["how"].items()]
    return "\n".join(lines)


def run_plan_command(cmd: PlanCommand) -> str | dict[str, Any]:
    """The table (default) or, with ``json``, every figure as one JSON object."""
    plan = build_plan(cmd.train_config(), cmd.cluster, cmd.probe)
    return plan if cmd.json else format_plan(plan)
