"""The training loop for GDUF (and DIGA): build from a TrainConfig, train, checkpoint, export.

``Trainer(cfg).train()`` is all an entry point does. Each piece is a named step so the loop
stays short: ``_build_*`` at start-up, ``train_step`` per step, ``_maybe_log`` / ``_maybe_save``.
Errors are never swallowed: a failing step stops the run with its traceback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unigendet.checkpoint.manager import CheckpointManager, consolidated_state_dict
from unigendet.config.loader import save_config
from unigendet.distributed import (
    all_reduce_sum,
    init_process_group,
    is_main_process,
    rank,
    world_size,
)
from unigendet.distributed.engine import build_engine, resolve_deepspeed_config
from unigendet.training.builders import (
    apply_freeze,
    apply_lora,
    build_data,
    build_model_and_vae,
    build_objective,
    build_teacher,
    build_tokenizer,
)
from unigendet.training.config import TrainConfig
from unigendet.training.ema import ShardedEMA
from unigendet.training.metrics import MetricsLogger
from unigendet.training.optim import lr_multiplier
from unigendet.utils.seeding import rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but CUDA is not available")
    return torch.device(name)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        init_process_group(self.device.type)
        self.bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and self.device.type == "cuda")
        # Same seed on every rank for model construction (DeepSpeed also broadcasts rank 0's
        # weights); per-rank streams (noise, data) are derived from (seed, rank) below.
        seed_everything(cfg.seed)
        self.tokenizer, self.special = build_tokenizer(cfg)
        self.model, self.vae = build_model_and_vae(cfg, self.tokenizer)
        # DIGA's teacher is copied from the stage-1 weights before anything is frozen or adapted.
        self.teacher = build_teacher(self.model, cfg.diga.teacher_layer) if cfg.stage == "diga" else None
        apply_freeze(self.model, cfg.freeze)
        if cfg.lora.enabled:
            self.model = apply_lora(self.model, cfg.lora)
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.vae.to(self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        if self.teacher is not None:
            self.teacher.to(self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        self.objective = build_objective(cfg, self.vae, self.teacher)
        self.data = build_data(cfg, self.tokenizer, self.special, rank(), world_size())
        ds_config = resolve_deepspeed_config(cfg, self.bf16)
        schedule = lr_multiplier(cfg.optim.warmup_steps, cfg.total_steps, cfg.optim.decay, cfg.optim.min_lr_ratio)
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, ds_config, schedule, cfg.optim.weight_decay)
        self.ema = ShardedEMA(self.engine.module, cfg.ema.decay, cfg.deepspeed.zero_stage) if cfg.ema.enabled else None
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + rank())
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last_k, cfg)
        self.state = TrainState()
        self.metrics = MetricsLogger(cfg, self.device)
        self._resume()
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("model: %.2fM trainable parameters; ZeRO-%d; %s; world size %d", n_train / 1e6,
                    cfg.deepspeed.zero_stage, "bf16" if self.bf16 else "fp32", world_size())

    # ---------------------------------------------------------------------------------------------

    def _per_rank_state(self) -> dict[str, Any]:
        return {"data": self.data.state_dict(), "rng": rng_state(), "noise": self.noise.get_state(),
                "tokens_seen": self.state.tokens_seen}

    def _resume(self) -> None:
        path = self.checkpoints.resolve_resume(self.cfg.checkpoint.resume)
        if path is None:
            return
        step, state = self.checkpoints.load(self.engine, path)
        if self.ema is not None:
            self.ema.load(path)
        self.state.step = step
        self.state.tokens_seen = state["tokens_seen"]
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.noise.set_state(state["noise"])

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        self.engine.train()
        loss, metrics = self.objective(self.engine, batch.to(self.device), self.noise,
                                       reduce_counts=all_reduce_sum, world_size=world_size())
        self.engine.backward(loss)
        self.engine.step()
        return metrics

    def train(self) -> TrainState:
        cfg = self.cfg
        try:
            self.metrics.start(self.state.step)
            data_iter = iter(self.data)
            while self.state.step < cfg.total_steps:
                start = time.perf_counter()
                for _ in range(cfg.deepspeed.gradient_accumulation_steps):
                    batch = next(data_iter)
                    metrics = self.train_step(batch)
                    self.state.tokens_seen += batch.sequence_length
                self.state.step += 1
                if self.ema is not None:
                    self.ema.update()
                self.data.check_quality()
                self.metrics.record(self.state.step, metrics, batch.sequence_length,
                                    time.perf_counter() - start, self.engine, self.scheduler)
                if self.state.step % cfg.checkpoint.interval == 0 or self.state.step == cfg.total_steps:
                    self.checkpoints.save(self.engine, self.state.step, self._per_rank_state(),
                                          write_extra=None if self.ema is None else self.ema.save)
            self.state.history = self.metrics.history
            if cfg.checkpoint.export_final:
                self.export(Path(cfg.checkpoint.dir) / "final")
                if self.ema is not None:
                    self.export(Path(cfg.checkpoint.dir) / "final_ema", ema=True)
            return self.state
        finally:
            self.metrics.close()
            self.data.close()

    def export(self, directory: Path, ema: bool = False) -> None:
        """Consolidated safetensors model directory (``UniGenDet.from_pretrained`` layout), plus
        the VAE and tokenizer, loadable without any training code. ``ema``: the averaged weights
        replace the trainable ones."""
        from unigendet.checkpoint.export import save_model_directory

        module = self.engine.module
        state = consolidated_state_dict(module, self.cfg.deepspeed.zero_stage)
        if ema:
            state.update(self.ema.consolidated())
        if is_main_process():
            save_model_directory(directory, module, state, self.vae, self.tokenizer, self.cfg)
            save_config(self.cfg, Path(directory) / "train_config.yaml")
            logger.info("exported model to %s", directory)
