"""One typed configuration for a training run (GDUF or DIGA), validated at start-up.

Loaded from YAML (with ``_base_`` includes) plus dotted command-line overrides; every unknown key
or bad value is an error naming its dotted path. The resolved config is saved in every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from unigendet.config.loader import ConfigError, load_config
from unigendet.data.packing import CFGDropout
from unigendet.models.config import ModelConfig
from unigendet.objectives.diga import DIGAConfig
from unigendet.objectives.gduf import GDUFLossConfig

logger = logging.getLogger(__name__)


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

    def validate(self) -> None:
        if self.kind != "random" and not self.path:
            raise ConfigError(f"path is required when kind is {self.kind!r}")
        if self.kind == "random" and self.tokenizer is None:
            raise ConfigError("tokenizer is required when kind is 'random' (a directory, or 'tiny')")


@dataclass
class TransformConfig:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int

    def validate(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise ConfigError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.max_size % self.stride or self.min_size % self.stride:
            raise ConfigError(f"max_size and min_size must be multiples of stride {self.stride}")


@dataclass
class SourceConfig:
    """One dataset. ``fakeclue``: a FakeClue-format JSON list + image root (detection samples);
    ``t2i``: ``data_files`` (parquet / arrow / jsonl files or globs, or ``save_to_disk`` directories)
    with image + caption columns; relative image paths resolve against ``image_root``."""

    kind: Literal["fakeclue", "t2i"]
    weight: float = 1.0
    # Every pack starts with one sample of each mandatory source (the reference's is_mandatory).
    mandatory: bool = False
    split: Literal["train", "heldout", "all"] = "train"
    heldout_fraction: float = 0.0
    # fakeclue
    json_path: str | None = None
    image_root: str | None = None
    label_convention: Literal["fakeclue", "real0_fake1"] = "fakeclue"
    balance_classes: bool = False
    # t2i
    data_files: list[str] = field(default_factory=list)
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None
    # Where `datasets` keeps its Arrow copy of t2i files (default: the `datasets` cache).
    cache_dir: str | None = None

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError("weight must be non-negative")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError("heldout_fraction must be in [0, 1)")
        if self.kind == "fakeclue" and not (self.json_path and self.image_root):
            raise ConfigError("a fakeclue source needs json_path and image_root")
        if self.kind == "t2i" and not self.data_files:
            raise ConfigError("a t2i source needs data_files")


@dataclass
class PackingConfig:
    """Token-budget packing per rank (reference defaults: 32768 / 36864 / 16384 / 16384 / 50)."""

    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    prefer_buffer_before: int = 16384
    max_buffer_size: int = 50

    def validate(self) -> None:
        if not 0 < self.max_num_tokens_per_sample <= self.max_num_tokens:
            raise ConfigError("need 0 < max_num_tokens_per_sample <= max_num_tokens")
        if not 0 < self.expected_num_tokens <= self.max_num_tokens:
            raise ConfigError("need 0 < expected_num_tokens <= max_num_tokens")


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    packing: PackingConfig = field(default_factory=PackingConfig)
    vit_transform: TransformConfig = field(default_factory=lambda: TransformConfig(980, 224, 14, 2_007_040))
    vae_transform: TransformConfig = field(default_factory=lambda: TransformConfig(1024, 512, 16, 1_806_336))
    cfg_dropout: CFGDropout = field(default_factory=lambda: CFGDropout(0.1, 0.3, 0.3))
    # SMSA: the clean VAE latent block precedes the ViT block in detection samples (paper ablation: false).
    smsa: bool = True
    num_workers: int = 1
    prefetch_factor: int = 2
    # Bad samples are skipped and counted; above this fraction (after min_seen samples) training stops.
    max_bad_fraction: float = 0.05
    min_seen_for_bad_check: int = 200
    seed: int = 40
    # Debugging: cycle the first N packs forever (loss must then fall); 0 = off.
    overfit_batches: int = 0

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: at least one data source is required")
        if sum(s.weight for s in self.sources.values()) <= 0:
            raise ConfigError("sources: weights must not all be zero")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("max_bad_fraction must be in [0, 1]")
        if self.num_workers < 0:
            raise ConfigError("num_workers must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant / cosine / linear decay. Reference: lr 2e-5,
    betas (0.9, 0.95), eps 1e-15, weight decay 0 (the paper says non-zero; value lost), clip 1.0."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 50
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("lr and eps must be positive, weight_decay and warmup_steps non-negative")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio must be in [0, 1]")


@dataclass
class DeepSpeedConfig:
    """Our view of the DeepSpeed engine. ``config_file`` (a JSON under configs/deepspeed/) may hold
    "auto" fields, filled from this run's config; without it one is generated from ``zero_stage``."""

    config_file: str | None = None
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_accumulation_steps: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    def validate(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params needs zero_stage 3")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("gradient_accumulation_steps must be >= 1")


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
    """LoRA on the experts' projections via peft (for single-GPU users); base weights frozen."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    experts: list[Literal["und", "gen"]] = field(default_factory=lambda: ["und", "gen"])
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        if self.enabled and (self.r < 1 or not self.experts or not self.targets):
            raise ConfigError("LoRA needs r >= 1 and non-empty experts and targets")


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.99

    def validate(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ConfigError("decay must be in (0, 1)")


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    interval: int = 200
    keep_last_k: int = 3
    # auto: resume the newest complete checkpoint in ``dir`` if any; none: start fresh; or a path.
    resume: str = "auto"
    # Write a consolidated safetensors model directory (from_pretrained layout) at the end.
    export_final: bool = True

    def validate(self) -> None:
        if self.interval < 1 or self.keep_last_k < 1:
            raise ConfigError("interval and keep_last_k must be >= 1")


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "unigendet"
    wandb_mode: Literal["online", "offline"] = "offline"
    run_name: str | None = None
    progress_bar: Literal["auto", "always", "never"] = "auto"  # auto: only on a terminal


@dataclass
class TrainConfig:
    stage: Literal["gduf", "diga"] = "gduf"
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=lambda: InitConfig(tokenizer="tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    # GDUF weights; DIGA uses loss.mse_weight and loss.timestep_shift with the ``diga`` section.
    loss: GDUFLossConfig = field(default_factory=GDUFLossConfig)
    diga: DIGAConfig = field(default_factory=DIGAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    total_steps: int = 1000
    seed: int = 4396
    activation_checkpointing: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"

    def validate(self) -> None:
        if self.total_steps < 1:
            raise ConfigError("total_steps must be >= 1")
        if self.optim.warmup_steps >= self.total_steps:
            # The reference runs ~1200 steps with 2000 warm-up steps, so its LR never peaks.
            logger.warning("optim.warmup_steps (%d) >= total_steps (%d): the learning rate never reaches optim.lr",
                           self.optim.warmup_steps, self.total_steps)
        kinds = {s.kind for s in self.data.sources.values()}
        if "fakeclue" in kinds and not self.model.visual_und:
            raise ConfigError("detection data needs model.visual_und: true")
        if "t2i" in kinds and not self.model.visual_gen:
            raise ConfigError("text-to-image data needs model.visual_gen: true")
        if self.data.smsa and "fakeclue" in kinds and not self.model.visual_gen:
            raise ConfigError("data.smsa needs model.visual_gen: true (the VAE block)")
        if self.model.attn_backend == "flex" and self.device == "cpu":
            raise ConfigError("model.attn_backend 'flex' cannot train on CPU (no backward); use 'sdpa'")
        if self.stage == "diga":
            if not self.model.diga_projector:
                raise ConfigError("stage diga needs model.diga_projector: true")
            if kinds != {"t2i"}:
                raise ConfigError("stage diga trains on text-to-image sources only (data.sources kinds must all be t2i)")
            layers = self.model.llm.num_hidden_layers
            for name in ("student_layer", "teacher_layer"):
                value = getattr(self.diga, name)
                if value is not None and value > layers:
                    raise ConfigError(f"diga.{name} ({value}) exceeds the model's {layers} layers")
        if self.lora.enabled and self.deepspeed.zero_stage == 3:
            raise ConfigError("LoRA is meant for single-GPU runs; use zero_stage <= 2 with lora.enabled")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
