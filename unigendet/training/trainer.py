"""The training loop shared by GDUF, DIGA and the baseline detectors; ``Trainer(cfg).train()`` is all an entry
point calls.

The constructor wires the components, each built from its own config section: tokenizer, model and
VAE, the stage's objective (DIGA's frozen teacher with it), freezing/LoRA, the packed data (with the
objective's sample hooks), the DeepSpeed engine, EMA, checkpoints and metrics; then it resumes from a
checkpoint when asked. ``train`` runs the optimiser steps, then exports the final model (and its
EMA). Errors are never swallowed: a failing step stops the run with its traceback.

The ``detector`` stage swaps the model, objective and data for a baseline detector
(:mod:`unigendet.objectives.detector`) and its labelled image folders (:mod:`unigendet.data.image_folders`);
the loop, checkpoints, guard, metrics and preemption are the same. Its differences: statistics the detector
fits from data (the spectral detector's) are fitted once at start-up, on the same images on every rank; a
detector trained with SAM (CoRIT) takes two forward/backward passes per step
(:mod:`unigendet.training.sharpness`); a detector with nothing to train (the spectral ``reference`` mode) takes
no optimiser step and is exported at once; the export is the detector's ``save_pretrained`` directory.

Failure behaviour: a step with a non-finite loss or gradient norm is skipped on every rank, and a run
that keeps failing or whose loss explodes stops with ``TrainingDivergedError``, exporting nothing
(``unigendet.training.guard``); a preemption signal ends the run with a checkpoint and exit status 75
(``unigendet.training.preemption``); checkpoints are written atomically and checked before resuming
(``unigendet.checkpoint.manager``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from unigendet.checkpoint.manager import CheckpointManager, consolidated_state_dict
from unigendet.config.loader import save_config, to_dict
from unigendet.data.image_folders import ImageFolderLoader
from unigendet.data.packing import PackedBatch
from unigendet.data.pipeline import PackedDataLoader
from unigendet.distributed import (
    all_gather_object,
    all_reduce_sum,
    init_process_group,
    is_main_process,
    rank,
    world_size,
)
from unigendet.distributed.engine import StepGate, build_engine
from unigendet.models.config import pack_geometry
from unigendet.objectives.detector import DetectorBatch, DetectorObjective
from unigendet.training.builders import build_model_and_vae, build_objective, build_tokenizer
from unigendet.training.config import TrainConfig
from unigendet.training.construction import zero3_construction_config
from unigendet.training.ema import build_ema
from unigendet.training.freeze import apply_freeze, apply_lora
from unigendet.training.guard import DivergenceGuard
from unigendet.training.metrics import MetricsLogger
from unigendet.training.preemption import EXIT_PREEMPTED, PreemptionWatch, TrainingPreempted
from unigendet.training.sharpness import SharpnessStep
from unigendet.utils.memory import GIB, memory_summary, peak_host_rss_bytes
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


@dataclass
class StepAgreement:
    """What every rank knows after the step's one all-reduce (the same values on every rank)."""

    loss: float  # mean over ranks and micro-steps; NaN if any was NaN
    nonfinite: bool  # some rank saw a non-finite loss (or unchecked non-finite gradients)
    preempt: bool  # some rank received a preemption signal


class Trainer:
    """One training run; its state (step, tokens seen, data position, RNG streams) is saved with every
    checkpoint so a resumed run continues exactly."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # Missing inputs are config errors, reported before anything is built.
        cfg.check_inputs()
        self.device = resolve_device(cfg.device)
        init_process_group(self.device.type)
        self.bf16 = cfg.use_bf16(self.device.type)
        # Same seed on every rank for model construction (DeepSpeed also broadcasts rank 0's
        # weights); per-rank streams (noise, data) are derived from (seed, rank) below.
        seed_everything(cfg.seed)
        self.preemption = PreemptionWatch(cfg.preemption.signal_numbers(), cfg.preemption.duplicate_window_s)
        if cfg.stage == "detector":
            self._build_detector()
        else:
            self._build_model_and_objective()
            self.data = PackedDataLoader.build(cfg.data, self.tokenizer, self.special, pack_geometry(cfg.model),
                                               rank(), world_size(), t2i_hooks=self.objective.t2i_hooks,
                                               worker_shielded_signals=self.preemption.signals)
        self.engine = self.optimizer = self.scheduler = self.gate = self.ema = self.sharpness = None
        if self._trains():
            self._build_engine()
        self.guard = DivergenceGuard(cfg.guard)
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + rank())
        self.checkpoints = CheckpointManager(cfg.checkpoint, run_config=cfg)
        self.state = TrainState()
        self.metrics = MetricsLogger(cfg.logging, cfg.checkpoint.dir, cfg.total_steps, self.device,
                                     run_config=to_dict(cfg))
        if self.engine is not None:
            self._resume()
        # A ZeRO-3 parameter's numel() is its (empty) placeholder's; ds_numel is the real count.
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        logger.info("model: %.2fM trainable parameters; ZeRO-%d; %s; world size %d", n_train / 1e6,
                    cfg.deepspeed.zero_stage, "bf16" if self.bf16 else "fp32", world_size())
        # Construction memory is per rank (each builds its own copy, or under ZeRO-3 its own partition), so every
        # rank's peak is shown.
        peaks = all_gather_object(peak_host_rss_bytes())
        logger.info("after construction: peak host RSS per rank %s GiB; rank 0: %s",
                    [round(p / GIB, 2) for p in peaks], memory_summary(self.device))

    def _build_model_and_objective(self) -> None:
        cfg = self.cfg
        self.tokenizer, self.special = build_tokenizer(cfg.init, cfg.model.llm.vocab_size, cfg.data.sources)
        self.model, self.vae = build_model_and_vae(cfg.init, cfg.model,
                                                   torch.bfloat16 if self.bf16 else torch.float32,
                                                   zero3_config=zero3_construction_config(cfg, self.bf16))
        peaks = all_gather_object(peak_host_rss_bytes())
        logger.info("after model construction: peak host RSS per rank %s GiB", [round(p / GIB, 2) for p in peaks])
        # The objective comes first: DIGA copies its teacher from the stage-1 weights, before anything
        # is frozen or adapted.
        self.objective = build_objective(cfg.stage, cfg.stage_config, cfg.model, self.model, self.vae)
        apply_freeze(self.model, cfg.freeze)
        if cfg.lora.enabled:
            self.model = apply_lora(self.model, cfg.lora)
        self.model.set_activation_checkpointing(cfg.activation_checkpointing, cfg.checkpoint_granularity)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.vae.to(self.device, dtype=dtype)
        self.vae.keep_posteriors(cfg.vae_posterior_cache)
        self.objective.to(self.device, dtype)

    def _build_detector(self) -> None:
        cfg = self.cfg
        self.tokenizer = self.special = self.vae = None
        self.objective = DetectorObjective.build(cfg.detector)
        self.model = self.objective.model
        self.objective.to(self.device, torch.float32)
        self.data = ImageFolderLoader.build(cfg.images, rank(), world_size(),
                                            worker_shielded_signals=self.preemption.signals)
        self.objective.fit_statistics(self.data)

    def _trains(self) -> bool:
        if isinstance(self.objective, DetectorObjective) and not self.objective.trainable:
            logger.info("%s has no trainable parameters (its statistics are all it learns): no optimizer steps; "
                        "total_steps is not used and the model is exported as it is", self.objective.detector.name)
            return False
        return True

    def _build_engine(self) -> None:
        cfg = self.cfg
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, cfg.deepspeed, cfg.optim,
                                                                   cfg.total_steps, self.bf16)
        if self.device.type == "cuda":
            logger.info("after engine construction: %s", memory_summary(self.device))
        self.gate = StepGate(self.engine)
        self.ema = build_ema(cfg.ema, self.engine.module, cfg.deepspeed.zero_stage)
        if cfg.stage == "detector" and cfg.detector.sharpness_radius > 0:
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            self.sharpness = SharpnessStep(params, cfg.detector.sharpness_radius)
            logger.info("SAM (rho %g) around the engine's optimizer: two forward/backward passes per step",
                        cfg.detector.sharpness_radius)

    # ---------------------------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        return {"data": self.data.state_dict(), "rng": rng_state(), "noise": self.noise.get_state(),
                "tokens_seen": self.state.tokens_seen}

    def _resume(self) -> None:
        path = self.checkpoints.resolve_resume()
        if path is None:
            return
        trainer_state, state = self.checkpoints.load(self.engine, path)
        if self.ema is not None:
            self.ema.load(path)
        self.state.step = trainer_state["step"]
        self.guard.load_state_dict(trainer_state["guard"])
        self.state.tokens_seen = state["tokens_seen"]
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.noise.set_state(state["noise"])

    def forward_backward(self, batch: PackedBatch | DetectorBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-step's forward, loss and backward; returns the (detached) loss and the metrics. With SAM, the
        second forward/backward at the perturbed weights follows (the loss and metrics are the first pass's)."""
        self.engine.train()
        batch = batch.to(self.device)
        loss, metrics = self.objective(self.engine, batch, self.noise,
                                       reduce_counts=all_reduce_sum, world_size=world_size())
        self.engine.backward(loss)
        if self.sharpness is not None:
            self.sharpness.ascend()
            perturbed, _ = self.objective(self.engine, batch, self.noise,
                                          reduce_counts=all_reduce_sum, world_size=world_size())
            self.engine.backward(perturbed)
            self.sharpness.restore()
        return loss.detach(), metrics

    def _next_batch(self, batches: Iterator) -> PackedBatch | DetectorBatch:
        batch = next(batches)
        return self.objective.prepare(batch) if isinstance(self.objective, DetectorObjective) else batch

    def optimizer_step(self, batches: Iterator[PackedBatch]) -> bool:
        """The micro-steps of one optimizer step, the guard's decision, the update (or its skip), then EMA,
        the data-quality check and the metrics. Returns whether some rank asked to stop for preemption."""
        start = time.perf_counter()
        gas = self.cfg.deepspeed.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), device=self.device)
        for micro in range(gas):
            batch = self._next_batch(batches)
            loss, metrics = self.forward_backward(batch)
            loss_sum += loss.float()
            nonfinite += (~torch.isfinite(loss)).float()
            self.state.tokens_seen += batch.sequence_length
            if micro < gas - 1:
                self.engine.step()  # inside the accumulation window DeepSpeed only counts the micro-step
        step = self.state.step + 1
        agreed = self._agree(loss_sum / gas, nonfinite + self.gate.local_nonfinite_gradients())
        spike = self.guard.check_spike(step, agreed.loss)
        applied = self.gate.step(skip=agreed.nonfinite or spike is not None)
        self.state.step = step
        grad_norm = self.engine.get_global_grad_norm()
        self.guard.record(step, agreed.loss, applied, grad_norm, spike)
        if self.ema is not None and applied:
            self.ema.update()
        self.data.check_quality()
        self.metrics.record(step, metrics, batch.sequence_length, time.perf_counter() - start, self.engine,
                            self.scheduler, counters=self.guard.counters())
        self.guard.stop_if_stuck(step, agreed.loss, grad_norm)
        return agreed.preempt

    def _agree(self, loss: torch.Tensor, nonfinite: torch.Tensor) -> StepAgreement:
        """One all-reduce (and host sync) per optimizer step: loss, non-finite count, preemption flag."""
        preempt = torch.tensor(float(self.preemption.requested), device=self.device)
        total = all_reduce_sum(torch.stack([loss.float(), nonfinite.float(), preempt])).tolist()
        return StepAgreement(loss=total[0] / world_size(), nonfinite=total[1] > 0, preempt=total[2] > 0)

    def save_checkpoint(self) -> Path:
        trainer_state = {"guard": self.guard.state_dict()}
        return self.checkpoints.save(self.engine, self.state.step, trainer_state, self._rank_state(),
                                     write_extra=None if self.ema is None else self.ema.save)

    def train(self) -> TrainState:
        """Train to ``total_steps`` and export. Raises ``TrainingDivergedError`` (nothing exported) when the
        guard stops the run, and ``TrainingPreempted`` (exit status 75) after a preemption checkpoint."""
        if self.engine is None:
            self._export_final()
            self._close_objective()
            return self.state
        self.preemption.install()
        batches = iter(self.data)
        try:
            self.metrics.start(self.state.step)
            while self.state.step < self.cfg.total_steps:
                preempt = self.optimizer_step(batches)
                saved = self.save_checkpoint() if self.checkpoints.due(self.state.step, self.cfg.total_steps) else None
                if preempt:
                    self._exit_for_preemption(saved)
            self.state.history = self.metrics.history
            self._export_final()
            return self.state
        finally:
            self.preemption.restore()
            self.metrics.close()
            # Stop the DataLoader workers now (gracefully), not when a traceback releases them at exit.
            batches.close()
            self.data.close()
            self._close_objective()

    def _close_objective(self) -> None:
        if isinstance(self.objective, DetectorObjective):
            self.objective.close()

    def _exit_for_preemption(self, saved: Path | None) -> None:
        path = saved if saved is not None else self.save_checkpoint()
        if is_main_process():
            logger.warning("preempted: stopped after step %d with checkpoint %s; exiting with status %d (resuming "
                           "continues from it)", self.state.step, path, EXIT_PREEMPTED)
        raise TrainingPreempted(self.state.step, path)

    def _export_final(self) -> None:
        if not self.cfg.checkpoint.export_final:
            if self.engine is None:
                logger.warning("checkpoint.export_final is false and %s takes no optimizer step: nothing is written",
                               self.cfg.detector.name)
            return
        directory = Path(self.cfg.checkpoint.dir)
        self.export(directory / "final")
        if self.ema is not None:
            self.export(directory / "final_ema", ema=True)

    def export(self, directory: Path, ema: bool = False) -> None:
        """Consolidated safetensors model directory (``UniGenDet.from_pretrained`` layout), plus
        the VAE and tokenizer, loadable without any training code. ``ema``: the averaged weights
        replace the trainable ones."""
        if self.cfg.stage == "detector":
            self._export_detector(Path(directory), ema)
            return
        from unigendet.checkpoint.export import save_model_directory

        module = self.engine.module
        state = consolidated_state_dict(module, self.cfg.deepspeed.zero_stage)
        if ema:
            state.update(self.ema.consolidated())
        if is_main_process():
            lora_scaling = self.cfg.lora.scaling if self.cfg.lora.enabled else None
            save_model_directory(directory, module, state, self.vae, self.tokenizer, lora_scaling,
                                 dtype=self.cfg.checkpoint.export_dtype,
                                 max_shard_size=self.cfg.checkpoint.export_shard_size())
            save_config(self.cfg, Path(directory) / "train_config.yaml")
            logger.info("exported model to %s", directory)

    def _export_detector(self, directory: Path, ema: bool) -> None:
        """The detector's ``save_pretrained`` directory (``unigendet.detectors.base.load_detector`` reads it) plus the
        run config; ``ema``: with the averaged head weights."""
        averages = self.ema.consolidated() if ema else {}
        if not is_main_process():
            return
        detector = self.objective.detector
        params = dict(self.model.named_parameters())
        kept = {name: params[name].detach().clone() for name in averages}
        with torch.no_grad():
            for name, value in averages.items():
                params[name].copy_(value.to(params[name].dtype))
        try:
            detector.save_pretrained(directory)
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    params[name].copy_(value)
        save_config(self.cfg, directory / "train_config.yaml")
        logger.info("exported %s detector to %s", detector.name, directory)
