"""Partitioned model construction for ZeRO-3: every rank materialises only its own slice of the parameters.

A ``full`` construction builds the whole model on every rank (random init in float32, or a checkpoint loaded in
the training dtype) and lets ``deepspeed.initialize`` partition it afterwards: for BAGEL-7B-MoT that is ~27 GiB of
bf16 weights per rank on the host, then on each GPU, before the partitioning. A ``partitioned`` construction
builds the model under ``deepspeed.zero.Init``, which partitions each submodule's parameters as soon as its
constructor returns, and then fills the partitions one module at a time:

* a checkpoint is read key by key (``safetensors.safe_open``) on rank 0 only and broadcast into each module's
  gathered parameters, cast to the training dtype (the values a full load gives);
* a random init repeats the model's own initialisation (``UniGenDet.init_weights``: the generic Qwen2-style draws,
  the und -> gen copy, the bridge draws and the zeroed ``llm2vae``) module by module, in the same order and from
  the same host generator, drawing each tensor in float32 on the host before casting, so the values equal a full
  construction's bit for bit on every device.

Constructors run on the host in float32 (zero.Init's tensor-creation overrides are off), so the random draws the
constructors make consume the host generator exactly as a full construction does, and buffers (RoPE frequencies,
sin-cos tables) stay float32 as the full construction keeps them. Each submodule's parameters are cast to the
training dtype just before zero.Init partitions them: the engine does not cast a model built under zero.Init.
Peak host memory per rank is then one submodule's float32 parameters (and, while it is filled, one module's
gathered parameters) plus this rank's partitions where they live on the host (CPU runs, parameter offload). The
constructors' random draws still cost host CPU time for a checkpoint load (values that are then overwritten).

LoRA works on the partitioned model (peft creates each adapter on its base layer's device and dtype; the engine
partitions the adapters). DIGA does not: its objective deep-copies the whole model as the frozen teacher, so a DIGA
run builds in full (``resolve_construction``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.models.config import ModelConfig
from unigendet.models.mot import GEN_SUFFIX
from unigendet.models.unigendet import OPTIONAL_HEADS, UniGenDet, _generic_init
from unigendet.models.vae import FluxVAE
from unigendet.utils.state_dict import format_key_problems

if TYPE_CHECKING:
    from unigendet.training.builders import InitConfig
    from unigendet.training.config import TrainConfig

logger = logging.getLogger(__name__)

CONSTRUCTION_MODES = ("auto", "full", "partitioned")


def resolve_construction(requested: str, zero_stage: int, stage: str) -> tuple[str, str]:
    """(``full`` or ``partitioned``, why) for ``init.construction`` = ``requested``. ``auto`` partitions under
    ZeRO-3 unless something needs the whole model on every rank (DIGA's teacher copy); ``partitioned`` is then a
    ConfigError naming what stands in the way. LoRA works on a partitioned model: peft puts each adapter on its base
    layer's device and dtype, and ZeRO-3 partitions the adapters when the engine starts."""
    if requested not in CONSTRUCTION_MODES:
        raise ConfigError(f"init.construction must be one of {', '.join(CONSTRUCTION_MODES)}, got {requested!r}")
    if requested == "full":
        return "full", "init.construction is full"
    blockers = []
    if zero_stage != 3:
        blockers.append(f"deepspeed.zero_stage is {zero_stage} (only ZeRO-3 partitions parameters)")
    if stage == "diga":
        blockers.append("stage diga copies the whole model as its frozen teacher")
    if not blockers:
        return "partitioned", "ZeRO-3: each rank materialises only its own partition"
    if requested == "partitioned":
        raise ConfigError("init.construction: partitioned cannot be used here: " + "; ".join(blockers)
                          + " (use auto or full)")
    return "full", "; ".join(blockers)


def zero3_construction_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any] | None:
    """The resolved DeepSpeed config to build the model partitioned with, or None for a full construction; logs
    which construction runs and why."""
    from unigendet.distributed import world_size
    from unigendet.distributed.engine import resolve_deepspeed_config

    mode, why = resolve_construction(cfg.init.construction, cfg.deepspeed.zero_stage, cfg.stage)
    logger.info("model construction: %s (%s)", mode, why)
    if mode == "full":
        return None
    return resolve_deepspeed_config(cfg.deepspeed, cfg.optim, bf16, world_size=world_size())


# ---------------------------------------------------------------------------------------------------------------
# zero.Init and gathering


def _zero_init(ds_config: dict[str, Any], dtype: torch.dtype):
    """``deepspeed.zero.Init`` for this run: constructors allocate on the host in float32 (no tensor-creation
    overrides), and each submodule's parameters are cast to ``dtype`` right before they are partitioned."""
    import deepspeed

    class _CastingInit(deepspeed.zero.Init):
        def _post_init_method(self, module: nn.Module) -> None:
            for param in module.parameters(recurse=False):
                if not hasattr(param, "ds_id") and param.is_floating_point():
                    param.data = param.data.to(dtype)
            super()._post_init_method(module)

    offload = ds_config.get("zero_optimization", {}).get("offload_param") or {}
    remote = "cpu" if str(offload.get("device", "none")).lower() == "cpu" else None
    return _CastingInit(config_dict_or_path=ds_config, dtype=dtype, remote_device=remote, tensor_overrides=[])


@contextmanager
def _gathered_on_host(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Gather ``params`` whole on every rank and, inside, let them hold float32 host copies, so initialisers draw
    from the host generator in float32 as a full construction does; rank 0's values are written back (cast to the
    parameter's dtype) and re-partitioned on exit. Every rank runs the same draws, which keeps every rank's
    generator where a full construction leaves it."""
    import deepspeed

    params = list(dict.fromkeys(params))
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        gathered = [p.data for p in params]
        for p in params:
            p.data = p.data.to("cpu", torch.float32)
        try:
            yield
        finally:
            for p, data in zip(params, gathered):
                if p.data is not data:
                    data.copy_(p.data)
                p.data = data


class _Alone:
    """One module seen as a tree of itself only: ``_generic_init`` (the model's per-type init rule, which walks
    ``root.modules()``) then initialises that module's own parameters and not its children's."""

    def __init__(self, module: nn.Module):
        self.module = module

    def modules(self) -> Iterator[nn.Module]:
        yield self.module


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _generic_init_by_module(root: nn.Module) -> None:
    """``_generic_init(root)``, one module's parameters gathered at a time, draws in the same order."""
    for module in root.modules():
        params = _own_params(module)
        if params:
            with _gathered_on_host(params):
                _generic_init(_Alone(module))


@torch.no_grad()
def _replay_init_weights(model: UniGenDet) -> None:
    """``UniGenDet.init_weights`` on a partitioned model (under zero.Init its own call saw only empty partitions
    and drew nothing): the same steps in the same order, a few parameters gathered at a time."""
    _generic_init_by_module(model)
    params = dict(model.language_model.named_parameters())
    for name, param in params.items():
        if GEN_SUFFIX in name:
            source = params[name.replace(GEN_SUFFIX, "")]
            with _gathered_on_host([param, source]):
                param.data.copy_(source.data)
    bridges = [getattr(model, name) for name in ("connector", "vae2llm", "llm2vae") if hasattr(model, name)]
    with _gathered_on_host(p for module in bridges for p in module.parameters()):
        model._init_bridges()
        if model.config.visual_gen:
            nn.init.zeros_(model.llm2vae.weight)
            nn.init.zeros_(model.llm2vae.bias)


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """The engine leaves a zero.Init model where it is, so its buffers (built on the host) go to the device here."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _local_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


# ---------------------------------------------------------------------------------------------------------------
# Loading by key


@torch.no_grad()
def _load_by_key(model: UniGenDet, sources: dict[str, tuple[Path, str]], fresh: list[str]) -> None:
    """Fill every parameter named in ``sources`` (our key -> (file, key in the file)) one module at a time: rank 0
    reads each tensor lazily and its values are broadcast into the gathered parameters (cast to their dtype).
    Heads in ``fresh`` get the model's fresh init instead, drawn in float32 from the host generator as a full load
    draws them."""
    import deepspeed

    is_reader = torch.distributed.get_rank() == 0
    done: set[int] = set()
    for prefix, module in model.named_modules():
        # The files are memory-mapped: their pages count as this process's memory while a file is open, so each
        # is opened per module and closed right after, instead of holding a whole shard mapped through the load.
        handles: dict[Path, Any] = {}
        _load_buffers(module, prefix, sources, handles)
        named = [(f"{prefix}.{name}" if prefix else name, p) for name, p in module._parameters.items()
                 if p is not None and id(p) not in done]
        named = [(key, p) for key, p in named if key in sources]
        if named:
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
                if is_reader:
                    for key, p in named:
                        file, file_key = sources[key]
                        p.data.copy_(_open(handles, file).get_tensor(file_key).to(p.dtype))
            done.update(id(p) for _, p in named)
        handles.clear()
    for name in fresh:
        _generic_init_by_module(model.get_submodule(name))
        logger.info("%s is not in the checkpoint: it is freshly initialised", name)


def _open(handles: dict[Path, Any], file: Path):
    from safetensors import safe_open

    if file not in handles:
        handles[file] = safe_open(str(file), framework="pt")
    return handles[file]


def _load_buffers(module: nn.Module, prefix: str, sources: dict[str, tuple[Path, str]],
                  handles: dict[Path, Any]) -> None:
    """Saved buffers are not partitioned: every rank reads its own copy (they are small)."""
    for name, buffer in module._buffers.items():
        key = f"{prefix}.{name}" if prefix else name
        if buffer is not None and key in sources:
            file, file_key = sources[key]
            buffer.copy_(_open(handles, file).get_tensor(file_key).to(buffer.dtype))


def _check_shapes(model: UniGenDet, shapes: dict[str, tuple[int, ...]], fresh_ok: tuple[str, ...]) -> list[str]:
    """The strict check of ``UniGenDet.load_state_dict_strict`` on shapes alone (``model`` on the meta device):
    every missing and unexpected key and every shape mismatch is a ValueError; returns the heads left fresh."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.llm.tie_word_embeddings:
        own.pop("language_model.lm_head.weight", None)
    fresh = [prefix.rstrip(".") for prefix in fresh_ok
             if any(k.startswith(prefix) for k in own) and not any(k.startswith(prefix) for k in shapes)]
    own = {k: v for k, v in own.items() if not k.startswith(tuple(f"{head}." for head in fresh))}
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    mismatched = [f"{k}: checkpoint {shapes[k]} vs model {own[k]}" for k in sorted(set(own) & set(shapes))
                  if shapes[k] != own[k]]
    if missing or unexpected or mismatched:
        raise ValueError("checkpoint does not match the model: " + format_key_problems(missing, unexpected, mismatched))
    return fresh


def _export_plan(directory: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, tuple[Path, str]],
                                                                     list[str]]:
    """(config, our key -> (file, key), fresh heads) of a ``save_pretrained`` directory, from its headers."""
    from safetensors import safe_open

    from unigendet.checkpoint.bagel import locate_safetensors_keys

    config = UniGenDet.read_config(directory, **overrides)
    located = locate_safetensors_keys(directory)
    shapes = {}
    for file in dict.fromkeys(located.values()):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    fresh = _check_shapes(UniGenDet.without_weights(config), shapes, OPTIONAL_HEADS)
    return config, {key: (file, key) for key, file in located.items()}, fresh


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def build_partitioned(init: InitConfig, model_cfg: ModelConfig, dtype: torch.dtype, ds_config: dict[str, Any]
                      ) -> tuple[UniGenDet, FluxVAE, ModelConfig]:
    """(model, VAE, the model's config) for ``init``, the model built under ``deepspeed.zero.Init`` with the
    engine's DeepSpeed config ``ds_config`` (its ``offload_param`` device keeps the partitions on the host). The
    parameter values equal those of a full construction cast to ``dtype``; the model is in train mode."""
    sources, fresh, config, vae_loader = _plan(init, model_cfg)
    # A checkpoint overwrites the constructors' random draws: they must not move the generator either, so the
    # fresh heads are drawn from where a full load draws them.
    keep_rng = torch.random.fork_rng(devices=[]) if sources is not None else nullcontext()
    with keep_rng, _zero_init(ds_config, dtype):
        model = UniGenDet(config)
    if sources is None:
        _replay_init_weights(model)
    else:
        _load_by_key(model, sources, fresh)
    _move_buffers(model, _local_device())
    return model.train(), vae_loader(), config


def _plan(init: InitConfig, model_cfg: ModelConfig):
    """(our key -> (file, key) or None for a random init, fresh heads, model config, VAE loader) for ``init``."""
    if init.kind == "random":
        return None, [], model_cfg, lambda: FluxVAE(model_cfg.vae)
    from unigendet.utils.hub import resolve_model_dir

    directory = resolve_model_dir(init.path)
    if init.kind == "bagel":
        from unigendet.checkpoint.bagel import VAE_WEIGHTS_NAME, bagel_model_config, bagel_weight_plan

        config = bagel_model_config(directory, init.weights, attn_backend=model_cfg.attn_backend,
                                    detection_head=model_cfg.detection_head,
                                    detection_loss=model_cfg.detection_loss,
                                    diga_projector=model_cfg.diga_projector,
                                    max_latent_size=model_cfg.max_latent_size, vae=model_cfg.vae)
        vae_path = directory / VAE_WEIGHTS_NAME
        if not vae_path.is_file():
            raise FileNotFoundError(f"VAE weights not found: {vae_path}")
        sources, fresh = bagel_weight_plan(directory, config, init.weights)
        return sources, fresh, config, lambda: FluxVAE.from_bfl_file(vae_path, config.vae)
    from unigendet.checkpoint.export import VAE_NAME

    config, sources, fresh = _export_plan(directory, {"attn_backend": model_cfg.attn_backend,
                                                      "diga_projector": model_cfg.diga_projector,
                                                      "diga_projector_mult": model_cfg.diga_projector_mult})
    vae_path = directory / VAE_NAME
    if not vae_path.is_file():
        raise FileNotFoundError(f"{directory} has no {VAE_NAME}")
    return sources, fresh, config, lambda: FluxVAE.load(vae_path, config.vae)
