"""``unigendet export``: re-write a model directory as a (sharded, bf16 by default) unigendet export or as a
BAGEL / UniGenDet directory, with a model card, optionally pushed to the Hugging Face hub."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unigendet.config.loader import ConfigError
from unigendet.utils.errors import RunError

logger = logging.getLogger(__name__)

_COPIED = ("train_config.yaml", "adapter")


@dataclass
class CardConfig:
    """What the generated model card (``README.md``) states beyond what the directory holds."""

    license: str = "apache-2.0"
    base_model: str | None = None  # hub id of the model the run started from, e.g. ByteDance-Seed/BAGEL-7B-MoT
    reports: list[str] = field(default_factory=list)  # evaluation report JSON files whose headline metrics to list

    def validate(self) -> None:
        if not self.license.strip():
            raise ConfigError("card.license must not be empty")


@dataclass
class ExportCommand:
    """``export``: the model at ``source`` re-written under ``out`` (see the module docstring)."""

    source: str  # our model directory or hub id; a BAGEL / UniGenDet directory with bagel: true
    out: str
    to: Literal["unigendet", "bagel"] = "unigendet"
    bagel: bool = False  # source is a BAGEL-7B-MoT / UniGenDet directory
    weights: str | None = None  # with bagel: fine-tuned weights over the source directory's
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Largest shard ("5GB", "500MB"); "none": one file. Default: 5GB for unigendet, one file for bagel (BAGEL's
    # own loader opens ema.safetensors; the UniGenDet tools and ours also read shards + index).
    max_shard_size: str | None = None
    card: CardConfig = field(default_factory=CardConfig)
    push_to_hub: str | None = None  # hub repo id to upload the export to (needs the network and a token)
    private: bool = True

    def validate(self) -> None:
        from unigendet.utils.safetensors_shards import parse_size

        if self.weights is not None and not self.bagel:
            raise ConfigError("weights overrides only apply to BAGEL/UniGenDet sources (bagel: true)")
        if self.max_shard_size not in (None, "none"):
            try:
                parse_size(self.max_shard_size)
            except ValueError as err:
                raise ConfigError(f"max_shard_size: {err}") from err
        if Path(self.out).resolve() == Path(self.source).resolve():
            raise ConfigError("out must differ from source (the export is written next to, not over, its source)")

    def check_inputs(self) -> None:
        from unigendet.utils.hub import looks_like_hub_id

        if not Path(self.source).exists() and not looks_like_hub_id(self.source):
            raise ConfigError(f"source: {self.source} does not exist")
        for key, path in [("weights", self.weights), *(("card.reports", r) for r in self.card.reports)]:
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{key}: {path} does not exist")

    def shard_size(self) -> str | None:
        if self.max_shard_size is None:
            return "5GB" if self.to == "unigendet" else None
        return None if self.max_shard_size == "none" else self.max_shard_size


def _load(cfg: ExportCommand):
    if cfg.bagel:
        from unigendet.checkpoint.bagel import load_bagel_checkpoint

        return load_bagel_checkpoint(cfg.source, weights=cfg.weights)
    from unigendet.checkpoint.export import load_model_directory

    return load_model_directory(cfg.source)


def run_export_command(cfg: ExportCommand) -> dict:
    """Write the export; returns a summary (directory, files, bytes, pushed commit)."""
    from unigendet.checkpoint.bagel import save_bagel_checkpoint
    from unigendet.checkpoint.export import save_model_directory
    from unigendet.checkpoint.hub import push_folder, write_model_card
    from unigendet.utils.hub import resolve_model_dir

    model, vae, tokenizer = _load(cfg)
    out = Path(cfg.out)
    if cfg.to == "bagel":
        save_bagel_checkpoint(out, model, vae, tokenizer, dtype=cfg.dtype, max_shard_size=cfg.shard_size())
    else:
        save_model_directory(out, model, model.state_dict(), vae, tokenizer, dtype=cfg.dtype,
                             max_shard_size=cfg.shard_size())
    source = resolve_model_dir(cfg.source)
    for name in _COPIED:  # the run's recipe (detector preprocessing reads it) and a LoRA adapter
        item = source / name
        if item.is_dir():
            shutil.copytree(item, out / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, out / name)
    write_model_card(out, cfg.to, license=cfg.card.license, base_model=cfg.card.base_model,
                     reports=cfg.card.reports, repo_id=cfg.push_to_hub)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    summary = {"out": str(out), "layout": cfg.to, "dtype": cfg.dtype, "files": [str(p.relative_to(out)) for p in files],
               "bytes": sum(p.stat().st_size for p in files)}
    if cfg.push_to_hub:
        try:
            summary["pushed"] = push_folder(out, cfg.push_to_hub, private=cfg.private)
        except Exception as err:  # network, offline mode, credentials, permissions: all end the same way
            raise RunError(f"the export is in {out}, but pushing it to {cfg.push_to_hub} failed "
                           f"({type(err).__name__}: {err}); upload it later with "
                           f"`huggingface-cli upload {cfg.push_to_hub} {out}`") from err
    logger.info("exported %s to %s (%s layout, %.1f MB)", cfg.source, out, cfg.to, summary["bytes"] / 1e6)
    return summary
