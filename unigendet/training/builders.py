"""Start-up builders: the tokenizer and the model and VAE (from ``InitConfig``), and the stage's objective."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unigendet.config.loader import ConfigError, to_dict
from unigendet.data.fakeclue import conversation_texts
from unigendet.data.pipeline import SourceConfig
from unigendet.data.t2i import caption_texts
from unigendet.data.tokenizer import (
    build_tiny_tokenizer,
    load_tokenizer,
    special_token_ids,
)
from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import GDUFLossConfig, GDUFObjective, Objective
from unigendet.objectives.diga import DIGAConfig, DIGAObjective

logger = logging.getLogger(__name__)

_GEOMETRY_SECTIONS = ("llm", "vit", "vae")


@dataclass
class InitConfig:
    """Where the weights come from. ``random``: fresh init of ``model``; ``bagel``: a BAGEL /
    UniGenDet directory (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors,
    tokenizer), whose geometry must equal ``model``'s; ``unigendet``: a directory exported by
    this project (``save_pretrained`` layout)."""

    kind: Literal["random", "bagel", "unigendet"] = "random"
    path: str | None = None
    # Fine-tuned weights that override the base directory's keys (bagel only).
    weights: str | None = None
    # Tokenizer directory; defaults to ``path``. ``tiny`` trains a small byte-level BPE on the
    # run's own texts (demo and tests only).
    tokenizer: str | None = None
    # A VAE weight file (ours, from ``FluxVAE.save``, or BFL's ``ae.safetensors``) that replaces the VAE of
    # ``kind``: the trained autoencoder of a geometry with no released weights (the demo's).
    vae: str | None = None
    # How the model is built: ``full`` on every rank; ``partitioned`` under deepspeed.zero.Init (ZeRO-3 only), each
    # rank holding only its partition; ``auto``: partitioned under ZeRO-3 unless DIGA needs the whole model.
    construction: Literal["auto", "full", "partitioned"] = "auto"

    def validate(self) -> None:
        if self.kind != "random" and not self.path:
            raise ConfigError(f"path is required when kind is {self.kind!r}")
        if self.kind == "random" and self.tokenizer is None:
            raise ConfigError("tokenizer is required when kind is 'random' (a directory, or 'tiny')")


def _texts_for_tiny_tokenizer(sources: dict[str, SourceConfig]) -> list[str]:
    """The run's own texts (questions, answers, captions) plus fixed phrases, so the tiny BPE
    covers them. Read identically on every rank, so every rank builds the same tokenizer."""
    texts = ["This is a real image.", "This is a fake image.", "Is this image real or fake?"]
    for source in sources.values():
        if source.kind == "fakeclue":
            texts += conversation_texts(source.json_path)
        else:
            texts += caption_texts(source.data_files, source.caption_column, source.caption_format)
    return texts


def build_tokenizer(init: InitConfig, vocab_size: int, sources: dict[str, SourceConfig]):
    """(tokenizer, special ids); ``sources`` supply the texts of a ``tiny`` tokenizer."""
    name = init.tokenizer or init.path
    if name == "tiny":
        tokenizer = build_tiny_tokenizer(_texts_for_tiny_tokenizer(sources), vocab_size=vocab_size)
    else:
        tokenizer = load_tokenizer(name)
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but model.llm.vocab_size is {vocab_size}")
    return tokenizer, special_token_ids(tokenizer)


def _check_same_geometry(expected, found, where: str) -> None:
    exp, got = to_dict(expected), to_dict(found)
    diffs = [f"{section}.{k}: config {exp[section][k]!r} vs {where} {got[section][k]!r}"
             for section in _GEOMETRY_SECTIONS for k in exp[section] if exp[section][k] != got[section][k]]
    if diffs:
        raise ConfigError(f"model geometry in the config disagrees with {where}: " + "; ".join(diffs))


def build_model_and_vae(init: InitConfig, model: ModelConfig, dtype: torch.dtype | None = None,
                        zero3_config: dict[str, Any] | None = None) -> tuple[UniGenDet, FluxVAE]:
    """The model and VAE ``init`` names; ``init.vae`` then replaces the VAE's weights.

    ``dtype``: the precision the run trains in. A checkpoint (``bagel``, ``unigendet``) is then loaded straight into
    it, so a bf16 run never holds a float32 copy of a 7B model on the host (about 54 GiB per rank); the values are
    the ones the engine's cast of a float32 model would give. A random init is drawn in float32 whatever ``dtype``
    (the engine casts it), so the same seed gives the same model in every precision.

    ``zero3_config`` (the engine's resolved ZeRO-3 DeepSpeed config) builds the model partitioned under
    ``deepspeed.zero.Init`` instead (``unigendet.training.construction``): each rank holds only its partition,
    already in ``dtype``, with the same values."""
    if zero3_config is not None:
        from unigendet.training.construction import build_partitioned

        built, vae, found = build_partitioned(init, model, dtype or torch.float32, zero3_config)
        if init.kind != "random":
            _check_same_geometry(model, found, init.path)
    else:
        built, vae = _build_model_and_vae(init, model, dtype or torch.float32)
    if init.vae is not None:
        vae = FluxVAE.from_file(init.vae, vae.cfg)
        logger.info("VAE weights from %s", init.vae)
    return built, vae


def _build_model_and_vae(init: InitConfig, model: ModelConfig, dtype: torch.dtype) -> tuple[UniGenDet, FluxVAE]:
    if init.kind == "random":
        return UniGenDet(model), FluxVAE(model.vae)
    if init.kind == "bagel":
        from unigendet.checkpoint.bagel import load_bagel_checkpoint

        # A BAGEL directory has no VAE config file: its ae.safetensors is read with the run's VAE geometry.
        loaded, vae, _ = load_bagel_checkpoint(init.path, weights=init.weights, attn_backend=model.attn_backend,
                                               detection_head=model.detection_head,
                                               detection_loss=model.detection_loss,
                                               diga_projector=model.diga_projector,
                                               max_latent_size=model.max_latent_size, vae=model.vae, dtype=dtype)
        _check_same_geometry(model, loaded.config, init.path)
        return loaded.train(), vae
    from unigendet.checkpoint.export import load_model_directory

    loaded, vae, _ = load_model_directory(init.path, dtype=dtype, attn_backend=model.attn_backend,
                                          diga_projector=model.diga_projector,
                                          diga_projector_mult=model.diga_projector_mult)
    _check_same_geometry(model, loaded.config, init.path)
    return loaded.train(), vae


def build_objective(stage: str, stage_cfg: GDUFLossConfig | DIGAConfig, model_cfg: ModelConfig, model: UniGenDet,
                    vae: FluxVAE) -> Objective:
    """The stage's objective. DIGA copies its frozen teacher from ``model`` here, so call this on the
    stage-1 weights, before anything is frozen or adapted."""
    if stage == "gduf":
        return GDUFObjective(stage_cfg, vae, model_cfg.latent_patch_size, model_cfg.detection_loss)
    return DIGAObjective.build(stage_cfg, model, vae, model_cfg.latent_patch_size)

