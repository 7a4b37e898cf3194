"""Start-up builders: each turns one section of the TrainConfig into the object the loop needs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from unigendet.config.loader import ConfigError, to_dict
from unigendet.data.tokenizer import (
    build_tiny_tokenizer,
    load_tokenizer,
    special_token_ids,
)
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.training.config import FreezeConfig, LoRAConfig, TrainConfig

logger = logging.getLogger(__name__)

_GEOMETRY_SECTIONS = ("llm", "vit", "vae")


def _texts_for_tiny_tokenizer(cfg: TrainConfig) -> list[str]:
    """The run's own texts (questions, answers, captions) plus fixed phrases, so the tiny BPE
    covers them. Read identically on every rank, so every rank builds the same tokenizer."""
    import json

    import pyarrow.parquet as pq

    texts = ["This is a real image.", "This is a fake image.", "Is this image real or fake?"]
    for source in cfg.data.sources.values():
        if source.kind == "fakeclue":
            for entry in json.loads(Path(source.json_path).read_text()):
                for turn in entry.get("conversations", []) if isinstance(entry, dict) else []:
                    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                        texts.append(turn["value"].replace("<image>", ""))
        else:
            for pattern in source.data_files:
                paths = sorted(Path().glob(pattern)) if any(c in pattern for c in "*?[") else [Path(pattern)]
                for path in paths:
                    if path.suffix != ".parquet":
                        raise ConfigError(f"init.tokenizer=tiny reads captions from parquet files only, got {path}")
                    texts += [str(t) for t in pq.read_table(path, columns=[source.caption_column]).column(0).to_pylist()]
    return texts


def build_tokenizer(cfg: TrainConfig):
    name = cfg.init.tokenizer or cfg.init.path
    if name == "tiny":
        tokenizer = build_tiny_tokenizer(_texts_for_tiny_tokenizer(cfg), vocab_size=cfg.model.llm.vocab_size)
    else:
        tokenizer = load_tokenizer(name)
    if len(tokenizer) > cfg.model.llm.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but model.llm.vocab_size is {cfg.model.llm.vocab_size}")
    return tokenizer, special_token_ids(tokenizer)


def _check_same_geometry(expected, found, where: str) -> None:
    exp, got = to_dict(expected), to_dict(found)
    diffs = [f"{section}.{k}: config {exp[section][k]!r} vs {where} {got[section][k]!r}"
             for section in _GEOMETRY_SECTIONS for k in exp[section] if exp[section][k] != got[section][k]]
    if diffs:
        raise ConfigError(f"model geometry in the config disagrees with {where}: " + "; ".join(diffs))


def build_model_and_vae(cfg: TrainConfig, tokenizer) -> tuple[UniGenDet, FluxVAE]:
    init = cfg.init
    if init.kind == "random":
        return UniGenDet(cfg.model), FluxVAE(cfg.model.vae)
    if init.kind == "bagel":
        from unigendet.checkpoint.bagel import load_bagel_checkpoint

        model, vae, _ = load_bagel_checkpoint(init.path, weights=init.weights, attn_backend=cfg.model.attn_backend,
                                              detection_head=cfg.model.detection_head,
                                              detection_loss=cfg.model.detection_loss,
                                              diga_projector=cfg.model.diga_projector,
                                              max_latent_size=cfg.model.max_latent_size)
        _check_same_geometry(cfg.model, model.config, init.path)
        return model.train(), vae
    from unigendet.checkpoint.export import load_model_directory

    model, vae, _ = load_model_directory(init.path, attn_backend=cfg.model.attn_backend,
                                         diga_projector=cfg.model.diga_projector,
                                         diga_projector_mult=cfg.model.diga_projector_mult)
    _check_same_geometry(cfg.model, model.config, init.path)
    return model.train(), vae


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

    unknown = set(lora.targets) - {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if unknown:
        raise ConfigError(f"lora.targets: unknown module names {sorted(unknown)}")
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_target_regex(lora))
    model = inject_adapter_in_model(config, model)
    n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    logger.info("LoRA r=%d on %s experts: %.2fM trainable parameters", lora.r, "+".join(lora.experts), n / 1e6)
    return model


def build_teacher(model: UniGenDet, layers: int | None) -> UniGenDet:
    """A frozen copy of the stage-1 model for DIGA, keeping only the decoder layers it reads."""
    import copy

    teacher = copy.deepcopy(model)
    if layers is not None:
        teacher.language_model.model.layers = teacher.language_model.model.layers[:layers]
    teacher.requires_grad_(False)
    return teacher.eval()


def build_objective(cfg: TrainConfig, vae: FluxVAE, teacher: UniGenDet | None = None):
    if cfg.stage == "gduf":
        from unigendet.objectives import GDUFObjective

        return GDUFObjective(cfg.loss, vae, cfg.model.latent_patch_size, cfg.model.detection_loss)
    from unigendet.objectives.diga import DIGAObjective

    return DIGAObjective(cfg.diga, teacher, vae, cfg.model.latent_patch_size, cfg.loss.mse_weight,
                         cfg.loss.timestep_shift)


def build_data(cfg: TrainConfig, tokenizer, special, rank: int, world: int):
    from unigendet.data.pipeline import PackedDataLoader

    return PackedDataLoader.from_config(cfg, tokenizer, special, rank, world)
