"""The configuration of one training run (GDUF, DIGA or a baseline detector): one section per component,
validated at start-up.

Each section's dataclass lives next to the component it configures (``DataConfig`` with the data
loader, ``CheckpointConfig`` with the checkpointer, ``DIGAConfig`` with the DIGA objective, ...);
``TrainConfig`` only composes them and checks the rules that span sections. Loaded from YAML (with
``_base_`` includes) plus dotted command-line overrides; every unknown key or bad value is an error
naming its dotted path. The resolved config is saved in every checkpoint and export.

Stages: ``gduf`` and ``diga`` train UniGenDet on packed sequences (sections ``model``, ``init``, ``data``,
``freeze``, ``lora`` and the stage's own ``gduf`` / ``diga``); ``detector`` trains a baseline detector on a
dataset folder layout (sections ``detector`` and ``images``). Every run shares ``optim``, ``deepspeed``, ``ema``,
``checkpoint``, ``logging``, ``guard`` and ``preemption``. A section the stage does not read is an error when set.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from unigendet.checkpoint.manager import CheckpointConfig
from unigendet.config.loader import ConfigError, load_config
from unigendet.config.ranges import require_range
from unigendet.data.image_folders import ImageFolderConfig
from unigendet.data.paths import check_source_paths
from unigendet.data.pipeline import DataConfig
from unigendet.distributed.engine import DeepSpeedConfig, OptimConfig, resolve_deepspeed_config
from unigendet.models.config import ModelConfig
from unigendet.objectives.detector import DetectorStageConfig
from unigendet.objectives.diga import DIGAConfig
from unigendet.objectives.gduf import GDUFLossConfig
from unigendet.training.builders import InitConfig
from unigendet.training.construction import resolve_construction
from unigendet.training.ema import EMAConfig
from unigendet.training.freeze import FreezeConfig, LoRAConfig
from unigendet.training.guard import GuardConfig
from unigendet.training.metrics import LoggingConfig
from unigendet.training.preemption import PreemptionConfig

logger = logging.getLogger(__name__)

# Each stage reads the section of its own name and no other stage's.
STAGES = ("gduf", "diga")
# The sections only some stages read; a stage that does not read one refuses a setting in it.
STAGE_SECTIONS = {
    "gduf": ("model", "init", "data", "freeze", "lora", "activation_checkpointing", "checkpoint_granularity",
             "vae_posterior_cache", "gduf"),
    "diga": ("model", "init", "data", "freeze", "lora", "activation_checkpointing", "checkpoint_granularity",
             "vae_posterior_cache", "diga"),
    "detector": ("detector", "images"),
}


@dataclass
class TrainConfig:
    stage: Literal["gduf", "diga", "detector"] = "gduf"
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=lambda: InitConfig(tokenizer="tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    # Stage settings (loss weights, DIGA's teacher): only the section named by ``stage`` is read.
    gduf: GDUFLossConfig = field(default_factory=GDUFLossConfig)
    diga: DIGAConfig = field(default_factory=DIGAConfig)
    # The detector stage: which detector, and the labelled image folders it trains on.
    detector: DetectorStageConfig = field(default_factory=DetectorStageConfig)
    images: ImageFolderConfig = field(default_factory=ImageFolderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    total_steps: int = 1000
    seed: int = 4396
    activation_checkpointing: bool = False
    # With activation_checkpointing: recompute whole decoder layers ("layer"), their attention and MLP halves
    # ("sublayer": twice the kept layer inputs, half the recomputation peak), or whole layers whose recomputation
    # checkpoints its halves, the MLP in token chunks ("nested": the inputs "layer" keeps, the lowest peak, one
    # more forward of each attention half; the longest packs fit).
    checkpoint_granularity: Literal["layer", "sublayer", "nested"] = "layer"
    # Images whose autoencoder posterior is kept between steps (0 = encode every image at every step). The
    # autoencoder is frozen, so a run that sees the same images many times encodes each once; each entry holds
    # 2 x latent channels x (side / 8)^2 floats for FLUX (128 KiB at 256 px in fp32).
    vae_posterior_cache: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"

    @property
    def stage_config(self) -> GDUFLossConfig | DIGAConfig | DetectorStageConfig:
        """The active stage's section."""
        return getattr(self, self.stage)

    def use_bf16(self, device_type: str) -> bool:
        """Whether the engine runs in bf16: as ``deepspeed.precision`` says, except that detectors train in fp32."""
        return self.stage != "detector" and self.deepspeed.use_bf16(device_type)

    def validate(self) -> None:
        require_range("total_steps", self.total_steps, 1)
        require_range("vae_posterior_cache", self.vae_posterior_cache, 0)
        # Per-rank streams are seeded with seed * 1000 + rank; numpy takes 32-bit seeds.
        require_range("seed", self.seed, 0, 2**32 - 1)
        if self.optim.warmup_steps >= self.total_steps:
            # The reference runs ~1200 steps with 2000 warm-up steps, so its LR never peaks.
            logger.warning("optim.warmup_steps (%d) >= total_steps (%d): the learning rate never reaches optim.lr",
                           self.optim.warmup_steps, self.total_steps)
        self._check_other_stages_unset()
        if self.stage == "detector":
            self.detector.resolve()
            self.images.require_root("images")
            self._check_detector_engine()
            return
        self._check_model_serves_data()
        resolve_construction(self.init.construction, self.deepspeed.zero_stage, self.stage)
        if self.checkpoint_granularity != "layer" and not self.activation_checkpointing:
            raise ConfigError(f"checkpoint_granularity: {self.checkpoint_granularity!r} applies only with "
                              "activation_checkpointing: true")
        if self.model.attn_backend == "flex" and self.device == "cpu":
            raise ConfigError("model.attn_backend 'flex' cannot train on CPU (no backward); use 'sdpa'")
        if self.stage == "diga":
            self.diga.validate_run(self.model, self.data.source_kinds())

    def check_inputs(self) -> None:
        """The files the run reads exist and the DeepSpeed config resolves: ConfigError naming the key, before
        anything is built (the command line calls this before training, and so does ``Trainer``)."""
        problems = self._detector_input_problems() if self.stage == "detector" else self._packed_input_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        resolve_deepspeed_config(self.deepspeed, self.optim, self.use_bf16(device))

    def _packed_input_problems(self) -> list[str]:
        problems = []
        for name, source in self.data.sources.items():
            problems += check_source_paths(source, f"data.sources.{name}")
        init = self.init
        for key, path, kind in (("init.path", init.path, "dir"), ("init.weights", init.weights, "file"),
                                ("init.vae", init.vae, "file"),
                                ("init.tokenizer", None if init.tokenizer == "tiny" else init.tokenizer, "dir")):
            if path is not None and not (Path(path).is_dir() if kind == "dir" else Path(path).is_file()):
                problems.append(f"{key}: no such {'directory' if kind == 'dir' else 'file'}: {path}")
        return problems

    def _detector_input_problems(self) -> list[str]:
        return self.images.input_problems("images") + self.detector.input_problems("detector")

    def _check_other_stages_unset(self) -> None:
        """A setting of a stage that does not run would be silently ignored: refuse it instead."""
        read = set(STAGE_SECTIONS[self.stage])
        defaults = {f.name: f for f in dataclasses.fields(self)}
        for name in dict.fromkeys(n for sections in STAGE_SECTIONS.values() for n in sections):
            if name in read:
                continue
            changed = _changed_keys(name, getattr(self, name), _field_default(defaults[name]))
            if not changed:
                continue
            if name in STAGES and self.stage in STAGES:
                raise ConfigError(f"{', '.join(changed)}: stage {self.stage!r} does not read the {name} section "
                                  f"(set {self.stage}.* instead, or remove the setting)")
            raise ConfigError(f"{', '.join(changed)}: stage {self.stage!r} does not read {name} (remove the setting)")

    def _check_detector_engine(self) -> None:
        """What the detector stage's engine supports: fp32, ZeRO 0-2, and SAM on ZeRO-0 without accumulation."""
        if self.deepspeed.precision == "bf16":
            raise ConfigError("deepspeed.precision: detectors train in fp32 (use 'auto' or 'fp32')")
        if self.deepspeed.zero_stage == 3:
            raise ConfigError("deepspeed.zero_stage: 3 would partition the frozen backbone too; detectors train with "
                              "zero_stage 0, 1 or 2")
        if self.detector.sharpness_radius > 0:
            if self.deepspeed.zero_stage != 0:
                raise ConfigError(f"deepspeed.zero_stage: {self.detector.name} trains with SAM "
                                  f"(detector.config.sam_rho={self.detector.sharpness_radius}), which needs whole "
                                  "gradients between its two passes: use zero_stage 0 (or sam_rho 0)")
            if self.deepspeed.gradient_accumulation_steps != 1:
                raise ConfigError("deepspeed.gradient_accumulation_steps: SAM takes its two gradients on one batch; "
                                  "use 1 and a larger images.batch_size")

    def _check_model_serves_data(self) -> None:
        kinds = self.data.source_kinds()
        if "fakeclue" in kinds and not self.model.visual_und:
            raise ConfigError("detection data needs model.visual_und: true")
        if "t2i" in kinds and not self.model.visual_gen:
            raise ConfigError("text-to-image data needs model.visual_gen: true")
        if self.data.smsa and "fakeclue" in kinds and not self.model.visual_gen:
            raise ConfigError("data.smsa needs model.visual_gen: true (the VAE block)")


def _field_default(spec: dataclasses.Field):
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _changed_keys(name: str, value, default) -> list[str]:
    """Dotted keys of ``value`` that differ from ``default`` (the section itself for a plain field)."""
    if not dataclasses.is_dataclass(value):
        return [name] if value != default else []
    return [f"{name}.{f.name}" for f in dataclasses.fields(value) if getattr(value, f.name) != getattr(default, f.name)]


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
