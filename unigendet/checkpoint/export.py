"""A self-contained model directory: ``config.json`` + ``model.safetensors`` (``UniGenDet``),
``vae.safetensors`` (FLUX VAE, diffusers layout) and the tokenizer files. Loading needs no
training code: ``load_model_directory(path)``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE

logger = logging.getLogger(__name__)

VAE_NAME = "vae.safetensors"
_LORA_A = re.compile(r"^(?P<prefix>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA weights into their base layers: ``W + scaling * B @ A``; returns plain keys."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value
    for key, a in state.items():
        m = _LORA_A.match(key)
        if not m:
            continue
        prefix, adapter = m.group("prefix"), m.group("adapter")
        b = state[f"{prefix}.lora_B.{adapter}.weight"]
        target = f"{prefix}.weight"
        base = merged[target]
        # Sum in fp32 and round once (casting the update to bf16 before the add rounded twice).
        merged[target] = (base.float() + scaling * (b.float() @ a.float())).to(base.dtype)
    return merged


def save_model_directory(directory: str | Path, model: torch.nn.Module, state: dict[str, torch.Tensor],
                         vae: FluxVAE, tokenizer, lora_scaling: float | None = None) -> None:
    """Write ``state`` (a consolidated state dict of ``model``) as a loadable directory. LoRA
    adapters in ``state`` are merged into their base weights with ``lora_scaling`` (alpha / r)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(".lora_A." in k for k in state):
        if lora_scaling is None:
            raise ValueError("the state holds LoRA adapters: pass lora_scaling (alpha / r) to merge them")
        state = merge_lora_state(state, lora_scaling)
        logger.info("merged LoRA adapters into the exported weights")
    UniGenDet.save_pretrained(model, directory, state_dict=state)
    vae.save(directory / VAE_NAME)
    tokenizer.save_pretrained(str(directory))


def load_model_directory(directory: str | Path, map_location: str = "cpu", **overrides):
    """(model, vae, tokenizer) from a directory written by ``save_model_directory``."""
    from unigendet.data.tokenizer import load_tokenizer

    directory = Path(directory)
    model = UniGenDet.from_pretrained(directory, map_location=map_location, **overrides)
    vae_path = directory / VAE_NAME
    if not vae_path.is_file():
        raise FileNotFoundError(f"{directory} has no {VAE_NAME}")
    vae = FluxVAE.load(vae_path, model.config.vae)
    return model, vae, load_tokenizer(directory)
