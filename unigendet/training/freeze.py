"""Which parameters train: freezing whole modules (``FreezeConfig``) and LoRA adapters (``LoRAConfig``)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_probability, require_range
from unigendet.models.unigendet import UniGenDet

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FreezeConfig:
    """Modules kept frozen (the VAE is never trained and is not listed)."""

    vit: bool = False
    connector: bool = False
    und_expert: bool = False
    gen_expert: bool = False
    embeddings: bool = False
    lm_head: bool = False
    detection_head: bool = False


@dataclass
class LoRAConfig:
    """LoRA on the experts' projections via peft; base weights frozen. Works with every ZeRO stage and with CPU
    offload of the optimizer (and, under ZeRO-3, of the parameters): the 7B recipe on one GPU."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    experts: list[Literal["und", "gen"]] = field(default_factory=lambda: ["und", "gen"])
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        require_range("r", self.r, 1)
        require_range("alpha", self.alpha, 1)
        require_probability("dropout", self.dropout, one_allowed=False)
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(f"targets: unknown module names {unknown} (choose from {', '.join(LORA_TARGETS)})")
        if self.enabled and (not self.experts or not self.targets):
            raise ConfigError("LoRA needs non-empty experts and targets")

    @property
    def scaling(self) -> float:
        """The factor of ``B @ A`` in the merged weight."""
        return self.alpha / self.r


def _freeze_patterns(freeze: FreezeConfig) -> list[str]:
    layers = r"language_model\.model\.(layers\.\d+\.[^.]+(\.[^.]+)*|norm(_moe_gen)?)\."
    patterns = []
    if freeze.vit:
        patterns.append(r"^vit_model\.")
    if freeze.connector:
        patterns.append(r"^connector\.")
    if freeze.embeddings:
        patterns.append(r"^language_model\.model\.embed_tokens\.")
    if freeze.lm_head:
        patterns.append(r"^language_model\.lm_head\.")
    if freeze.detection_head:
        patterns.append(r"^detection_head\.")
    if freeze.gen_expert:
        patterns.append(r"^language_model\.model\..*_moe_gen")
        patterns.append(r"^(time_embedder|vae2llm|llm2vae)\.")
    if freeze.und_expert:
        # The und expert is every decoder weight without the gen suffix (plus the und final norm).
        patterns.append(r"^(?!.*_moe_gen)" + layers)
    return patterns


def apply_freeze(model: torch.nn.Module, freeze: FreezeConfig) -> None:
    patterns = [re.compile(p) for p in _freeze_patterns(freeze)]
    frozen = 0
    for name, p in model.named_parameters():
        if any(pat.search(name) for pat in patterns):
            p.requires_grad_(False)
            frozen += p.numel()
    if patterns:
        logger.info("froze %.2fM parameters", frozen / 1e6)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("freeze: every parameter is frozen; nothing would train")


def lora_target_regex(lora: LoRAConfig) -> str:
    suffix = {"und": "", "gen": "_moe_gen"}
    alts = []
    for expert in lora.experts:
        s = suffix[expert]
        attn = [t for t in lora.targets if t.endswith("proj") and t[0] in "qkvo"]
        mlp = [t for t in lora.targets if t in ("gate_proj", "up_proj", "down_proj")]
        if attn:
            alts.append(rf"self_attn\.({'|'.join(attn)}){s}")
        if mlp:
            alts.append(rf"mlp{s}\.({'|'.join(mlp)})")
    return rf"language_model\.model\.layers\.\d+\.({'|'.join(alts)})"


def apply_lora(model: UniGenDet, lora: LoRAConfig) -> UniGenDet:
    """Inject peft LoRA adapters into the chosen experts' projections; everything else frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_target_regex(lora))
    model = inject_adapter_in_model(config, model)
    n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    logger.info("LoRA r=%d on %s experts: %.2fM trainable parameters", lora.r, "+".join(lora.experts), n / 1e6)
    return model
