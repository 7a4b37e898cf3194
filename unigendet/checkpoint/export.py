"""A self-contained model directory: ``config.json`` + ``model.safetensors`` (or ``model-0000i-of-0000N``
shards + ``model.safetensors.index.json``) for ``UniGenDet``, ``vae.safetensors`` (FLUX VAE, diffusers
layout) and the tokenizer files. A LoRA run also gets ``adapter/``: a peft adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` puts on the
base model the run started from. Loading needs no training code: ``load_model_directory(path or hub id)``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.utils.hub import resolve_model_dir
from unigendet.utils.safetensors_shards import DEFAULT_MAX_SHARD_SIZE, cast_floating

logger = logging.getLogger(__name__)

VAE_NAME = "vae.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Keys of a peft adapter file name the wrapped model's modules under this prefix (PeftModel.save_pretrained).
PEFT_PREFIX = "base_model.model."
_LORA_A = re.compile(r"^(?P<prefix>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_LAYER_INDEX = re.compile(r"\.layers\.\d+\.")


def _lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module path -> (adapter name, lora_A key) of every LoRA-adapted layer in ``state``."""
    found = {}
    for key in state:
        m = _LORA_A.match(key)
        if m:
            found[m.group("prefix")] = (m.group("adapter"), key)
    return found


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA weights into their base layers: ``W + scaling * B @ A``; returns plain keys."""
    merged = base_state(state)
    for prefix, (adapter, key_a) in _lora_modules(state).items():
        a, b = state[key_a], state[f"{prefix}.lora_B.{adapter}.weight"]
        target = f"{prefix}.weight"
        base = merged[target]
        # Sum in fp32 and round once (casting the update to bf16 before the add rounded twice).
        merged[target] = (base.float() + scaling * (b.float() @ a.float())).to(base.dtype)
    return merged


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without its LoRA weights, base layers under their plain names: the model the adapter goes on."""
    return {key.replace(".base_layer.", "."): value for key, value in state.items()
            if ".lora_A." not in key and ".lora_B." not in key}


def lora_adapter(state: dict[str, torch.Tensor], scaling: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """(peft ``LoraConfig`` keyword arguments, adapter weights under peft's file keys) of the LoRA weights in
    ``state``. The rank is read from the ``lora_A`` shapes, alpha is ``scaling * r``, and the target modules
    are a regex over the adapted module paths with the layer index generalised."""
    modules = _lora_modules(state)
    if not modules:
        raise ValueError("the state holds no LoRA weights")
    ranks = {state[key_a].shape[0] for _, key_a in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks differ between modules ({sorted(ranks)}); one adapter config cannot hold them")
    r = ranks.pop()
    patterns = sorted({re.escape(_LAYER_INDEX.sub(".layers.#.", prefix)).replace("\\#", "#").replace("#", r"\d+")
                       for prefix in modules})
    config = {"r": r, "lora_alpha": scaling * r, "lora_dropout": 0.0,
              "target_modules": rf"^({'|'.join(patterns)})$", "bias": "none"}
    weights = {}
    for prefix, (adapter, key_a) in modules.items():
        weights[f"{PEFT_PREFIX}{prefix}.lora_A.weight"] = state[key_a]
        weights[f"{PEFT_PREFIX}{prefix}.lora_B.weight"] = state[f"{prefix}.lora_B.{adapter}.weight"]
    return config, weights


def save_lora_adapter(directory: str | Path, state: dict[str, torch.Tensor], scaling: float) -> Path:
    """Write the LoRA weights of ``state`` as a peft adapter directory; returns it."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config, weights = lora_adapter(state, scaling)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    LoraConfig(**config).save_pretrained(str(directory))
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return directory


def save_model_directory(directory: str | Path, model: torch.nn.Module, state: dict[str, torch.Tensor],
                         vae: FluxVAE, tokenizer, lora_scaling: float | None = None,
                         dtype: str | torch.dtype | None = None,
                         max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write ``state`` (a consolidated state dict of ``model``) as a loadable directory. LoRA adapters in
    ``state`` are merged into their base weights with ``lora_scaling`` (alpha / r) and also written
    unmerged as a peft adapter in ``adapter/``. ``dtype`` casts the floating weights (None: as stored);
    weights above ``max_shard_size`` are sharded with an index (None: one file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(".lora_A." in k for k in state):
        if lora_scaling is None:
            raise ValueError("the state holds LoRA adapters: pass lora_scaling (alpha / r) to merge them")
        save_lora_adapter(directory / ADAPTER_DIR, cast_floating(state, dtype), lora_scaling)
        state = merge_lora_state(state, lora_scaling)
        logger.info("merged LoRA adapters into the exported weights; the adapter alone is in %s/", ADAPTER_DIR)
    UniGenDet.save_pretrained(model, directory, state_dict=state, dtype=dtype, max_shard_size=max_shard_size)
    vae.save(directory / VAE_NAME)
    tokenizer.save_pretrained(str(directory))


def load_model_directory(directory: str | Path, map_location: str = "cpu", dtype: torch.dtype = torch.float32,
                         revision: str | None = None, **overrides):
    """(model, vae, tokenizer) from a directory written by ``save_model_directory``, or a Hugging Face hub id
    holding one (see ``unigendet.utils.hub.resolve_model_dir``)."""
    from unigendet.data.tokenizer import load_tokenizer

    directory = resolve_model_dir(directory, revision)
    model = UniGenDet.from_pretrained(directory, map_location=map_location, dtype=dtype, **overrides)
    vae_path = directory / VAE_NAME
    if not vae_path.is_file():
        raise FileNotFoundError(f"{directory} has no {VAE_NAME}")
    vae = FluxVAE.load(vae_path, model.config.vae)
    return model, vae, load_tokenizer(directory)
