"""CRAFT's diffusion parts: the image-variation pipeline's components (built at random or read strictly from a
local directory), DDIM inversion and reconstruction, and the class-guided latent perturbation.

Components (diffusers / transformers classes):

* ``image_encoder``: ``CLIPVisionModelWithProjection``; its ``image_embeds`` [B, P], as a one-token sequence
  [B, 1, P], condition every UNet call (the image conditions its own reconstruction);
* ``unet``: ``UNet2DConditionModel`` predicting the noise (``prediction_type: epsilon``), cross-attention width P;
* ``vae``: ``AutoencoderKL``; latents are ``scaling_factor`` * the posterior mean;
* ``scheduler``: its configuration gives the noise schedule (cumulative alphas) and the timestep spacing of a
  ``DDIMScheduler``; the pipeline's own scheduler class (PNDM in the public image-variation pipeline) does not
  matter, only these numbers;
* ``feature_extractor``: the CLIP input size, mean and standard deviation (applied here in torch, so the
  conditioning stays differentiable).

A directory holds them in the layout of the public Stable Diffusion image-variation pipeline: ``image_encoder/``
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), ``unet/`` and ``vae/`` (``config.json`` +
``diffusion_pytorch_model.safetensors`` or ``.bin``, or a sharded ``.safetensors.index.json``),
``scheduler/scheduler_config.json`` and ``feature_extractor/preprocessor_config.json``. Loading is strict: a
missing folder or file, a missing, unexpected or mis-shaped weight, an unsupported prediction type or a
conditioning width that does not match the UNet is an error naming the path.

DDIM (deterministic, guidance scale 1): with cumulative alphas a_0 (the clean end: 1 with ``set_alpha_to_one``,
else the first training alpha) and a_i = alpha_bar(tau_i) for the T inference timesteps tau_1 < ... < tau_T,
one inversion step i (i = 1..T) and its reverse are

    eps = unet(x, tau_i, c);  x0 = (x - sqrt(1 - a_from) eps) / sqrt(a_from);  x' = sqrt(a_to) x0 + sqrt(1 - a_to) eps

with (a_from, a_to) = (a_{i-1}, a_i) for inversion (x = x_{i-1}) and (a_i, a_{i-1}) for reconstruction
(x = x_i). With a UNet that predicts zero the two are exact inverses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import check_state_keys

logger = logging.getLogger(__name__)

COMPONENTS = ("image_encoder", "unet", "vae", "scheduler", "feature_extractor")

# The geometry of the public Stable Diffusion image-variation pipeline (SD v1 UNet conditioned on CLIP ViT-L/14
# image embeddings): the defaults when no directory is named.
SD_VARIATION_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
SD_VARIATION_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}
SD_VARIATION_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215}
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "trained_betas": None}
CLIP_PREPROCESS: dict[str, Any] = {
    "size": 224, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}

_SCHEDULER_KEYS = tuple(SD_SCHEDULER)
# The CLIPVisionConfig fields that define the encoder (what a saved detector records).
_ENCODER_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
                 "initializer_range", "initializer_factor")
_WEIGHT_NAMES = {
    "image_encoder": ("model.safetensors", "pytorch_model.bin"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
}
# Buffers older checkpoints store that current model classes rebuild themselves (never weights).
_IGNORED_FILE_KEYS = ("vision_model.embeddings.position_ids",)


@dataclass
class CraftPipelineConfig:
    """Where the image-variation components come from. ``path``: a local directory in the pipeline layout (see the
    module docstring); its component configs then replace the dicts below when the detector is built, so a saved
    detector records the geometry it ran. ``path: null``: seeded random weights (``init_seed``) at the geometry of
    the dicts (null = the public pipeline's geometry; the tiny recipe gives small ones)."""

    path: str | None = None
    image_encoder: dict[str, Any] | None = None
    unet: dict[str, Any] | None = None
    vae: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    feature_extractor: dict[str, Any] | None = None
    init_seed: int = 0

    def validate(self) -> None:
        scheduler = self.scheduler_config()
        if scheduler["prediction_type"] != "epsilon":
            raise ConfigError(f"scheduler.prediction_type: only 'epsilon' is supported, got "
                              f"{scheduler['prediction_type']!r}")
        encoder, unet = self.image_encoder_config(), self.unet_config()
        if encoder.get("projection_dim") != unet.get("cross_attention_dim"):
            raise ConfigError(f"image_encoder.projection_dim ({encoder.get('projection_dim')}) must equal "
                              f"unet.cross_attention_dim ({unet.get('cross_attention_dim')})")
        if self.vae_config().get("latent_channels", 4) != unet.get("in_channels", 4):
            raise ConfigError("vae.latent_channels must equal unet.in_channels")

    def image_encoder_config(self) -> dict[str, Any]:
        return dict(self.image_encoder if self.image_encoder is not None else SD_VARIATION_IMAGE_ENCODER)

    def unet_config(self) -> dict[str, Any]:
        return dict(self.unet if self.unet is not None else SD_VARIATION_UNET)

    def vae_config(self) -> dict[str, Any]:
        return dict(self.vae if self.vae is not None else SD_VARIATION_VAE)

    def scheduler_config(self) -> dict[str, Any]:
        return {**SD_SCHEDULER, **(self.scheduler or {})}

    def preprocess_config(self) -> dict[str, Any]:
        return {**CLIP_PREPROCESS, **(self.feature_extractor or {})}


@dataclass
class Components:
    image_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    scheduler: Any
    preprocess: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- building
def build_components(config: CraftPipelineConfig) -> Components:
    """Random components at the config's geometry, or the directory's (then the config adopts its geometry)."""
    if config.path is not None:
        return load_components(config)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config.image_encoder_config()))
        unet = UNet2DConditionModel.from_config(config.unet_config())
        vae = AutoencoderKL.from_config(config.vae_config())
    scheduler = DDIMScheduler(**_scheduler_kwargs(config.scheduler_config()))
    return Components(encoder, unet, vae, scheduler, config.preprocess_config())


def _scheduler_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in _SCHEDULER_KEYS}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"image-variation pipeline: {path} is missing ({what}); expected the layout "
                          f"image_encoder/, unet/, vae/, scheduler/, feature_extractor/")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_require(path, "a JSON config").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _weights_file_state(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """The component's weights: one safetensors/bin file or a sharded safetensors index."""
    for name in _WEIGHT_NAMES[component]:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        index = folder / f"{name}.index.json"
        if index.is_file() and name.endswith(".safetensors"):
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(_require(folder / shard, "a weight shard"))))
            return state
    raise ConfigError(f"image-variation pipeline: {folder} has no weights (expected one of "
                      f"{', '.join(_WEIGHT_NAMES[component])})")


def _load_strict(module: nn.Module, folder: Path, component: str) -> None:
    state = {k: v for k, v in _weights_file_state(folder, component).items() if k not in _IGNORED_FILE_KEYS}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_keys(expected, state, str(folder))
    module.load_state_dict(state, strict=True)


def _model_config(folder: Path) -> dict[str, Any]:
    """A saved model config without the bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in _read_json(folder / "config.json").items() if not k.startswith("_")}


def load_components(config: CraftPipelineConfig) -> Components:
    """Read every component from ``config.path`` strictly and record their configs in ``config``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = Path(config.path)
    if not root.is_dir():
        raise ConfigError(f"pipeline.path: no such directory: {root}")
    for name in COMPONENTS:
        _require(root / name, f"the {name} component")
    _require(root / "image_encoder" / "config.json", "a JSON config")
    encoder_cfg = CLIPVisionConfig.from_pretrained(str(root / "image_encoder"))
    encoder = CLIPVisionModelWithProjection(encoder_cfg)
    _load_strict(encoder, root / "image_encoder", "image_encoder")
    unet_cfg = _model_config(root / "unet")
    unet = UNet2DConditionModel.from_config(unet_cfg)
    _load_strict(unet, root / "unet", "unet")
    vae_cfg = _model_config(root / "vae")
    vae = AutoencoderKL.from_config(vae_cfg)
    _load_strict(vae, root / "vae", "vae")
    saved_scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
    scheduler_cfg = {**SD_SCHEDULER, **{k: v for k, v in saved_scheduler.items() if k in _SCHEDULER_KEYS}}
    preprocess = _preprocess_from(_read_json(root / "feature_extractor" / "preprocessor_config.json"),
                                  root / "feature_extractor")
    config.image_encoder = {k: v for k, v in encoder_cfg.to_dict().items() if k in _ENCODER_KEYS}
    config.unet = _diffusers_dict(unet.config)
    config.vae = _diffusers_dict(vae.config)
    config.scheduler = scheduler_cfg
    config.feature_extractor = preprocess
    config.validate()
    logger.info("image-variation pipeline read from %s", root)
    return Components(encoder, unet, vae, DDIMScheduler(**_scheduler_kwargs(scheduler_cfg)), preprocess)


def _preprocess_from(data: dict[str, Any], where: Path) -> dict[str, Any]:
    """CLIP input size, mean and std from a ``CLIPImageProcessor`` config (crop size wins over the resize size)."""
    size = data.get("crop_size", data.get("size"))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if not isinstance(size, int) or "image_mean" not in data or "image_std" not in data:
        raise ConfigError(f"{where}/preprocessor_config.json: needs crop_size (or size), image_mean and image_std")
    return {"size": size, "image_mean": list(data["image_mean"]), "image_std": list(data["image_std"])}


def _diffusers_dict(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def save_components(components: Components, directory: str | Path) -> Path:
    """Write the components in the pipeline layout (the tests build a tiny directory with it)."""
    root = Path(directory)
    components.image_encoder.save_pretrained(root / "image_encoder")
    components.unet.save_pretrained(root / "unet")
    components.vae.save_pretrained(root / "vae")
    components.scheduler.save_pretrained(root / "scheduler")
    (root / "feature_extractor").mkdir(parents=True, exist_ok=True)
    pre = components.preprocess
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": pre["size"], "width": pre["size"]}, "size": {"shortest_edge": pre["size"]},
        "image_mean": pre["image_mean"], "image_std": pre["image_std"], "do_resize": True, "do_center_crop": True,
        "do_normalize": True, "image_processor_type": "CLIPImageProcessor"}, indent=2))
    return root


# ---------------------------------------------------------------------------------------------- DDIM
class DDIMPath:
    """The T inference timesteps (ascending) and their cumulative alphas, with a_0 the clean end."""

    def __init__(self, scheduler: Any, num_steps: int):
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.flip(0).long().cpu()  # tau_1 < ... < tau_T
        alphas = scheduler.alphas_cumprod.double()
        clean = torch.tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64)
        self.alphas = torch.cat([clean.view(1), alphas[self.timesteps]]).float()  # a_0 .. a_T

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """One deterministic DDIM move of x between noise levels a_from -> a_to given the predicted noise."""
    x0 = (x - (1.0 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1.0 - a_to) ** 0.5 * eps


# ---------------------------------------------------------------------------------------------- perturbation
def perturb_latent(z: torch.Tensor, mu: torch.Tensor, step: float, bound: float, eps: float = 1e-6
                   ) -> torch.Tensor:
    """z' = z + step * (z - mu) / (||z - mu|| + eps), then rescaled so that ||z'|| <= bound (norms per sample over
    the whole latent). A sample equal to ``mu`` is left where it is (direction 0)."""
    flat = z.flatten(1)
    away = flat - mu.flatten().to(flat)
    moved = flat + step * away / (away.norm(dim=1, keepdim=True) + eps)
    norm = moved.norm(dim=1, keepdim=True)
    moved = moved * torch.clamp(bound / norm.clamp_min(1e-12), max=1.0)
    return moved.view_as(z)
