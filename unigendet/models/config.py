"""Model geometry: plain dataclasses (JSON/YAML serialisable) that build transformers configs on demand.

Defaults are the BAGEL-7B-MoT geometry; ``configs/model/tiny.yaml`` shrinks every width so a
training step runs on CPU. The full-scale model is the same code with these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_finite, require_positive, require_range
from unigendet.data.packing import PackGeometry

AttnBackend = Literal["sdpa", "flex", "flash"]


def _require_at_least_one(section, *names: str) -> None:
    """Counts and sizes: integers >= 1."""
    for name in names:
        require_range(name, getattr(section, name), 1)


@dataclass
class LLMConfig:
    """Qwen2.5 decoder with Mixture-of-Transformers experts (und / gen)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    # "mot": per-expert attention + MLP + norms (BAGEL-7B-MoT); "moe": shared attention, per-expert MLP;
    # "dense": one expert (vanilla Qwen2 with BAGEL's qk-norm option).
    layer_module: Literal["mot", "moe", "dense"] = "mot"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _require_at_least_one(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        require_positive("rope_theta", self.rope_theta)
        require_positive("rms_norm_eps", self.rms_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for RoPE")

    def to_hf(self):
        """A transformers ``Qwen2Config`` for the building blocks (MLP, RoPE) and for parity tests."""
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            use_sliding_window=False,
            attention_dropout=0.0,
        )


@dataclass
class ViTConfig:
    """SigLIP so400m/14 NaViT encoder. ``num_hidden_layers`` is the number of layers *built*
    (BAGEL stores 26 = 27 + 1 + select_layer(-2))."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 26
    patch_size: int = 14
    num_channels: int = 3
    max_num_patch_per_side: int = 70
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def validate(self) -> None:
        _require_at_least_one(self, "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                              "patch_size", "num_channels", "max_num_patch_per_side")
        require_positive("layer_norm_eps", self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    def to_hf(self, attn_implementation: str = "sdpa"):
        from transformers import SiglipVisionConfig

        cfg = SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_hidden_layers=self.num_hidden_layers,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            image_size=self.patch_size * self.max_num_patch_per_side,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            attention_dropout=0.0,
        )
        cfg._attn_implementation = attn_implementation
        return cfg


@dataclass
class VAEConfig:
    """FLUX.1 autoencoder geometry (diffusers ``AutoencoderKL`` arguments)."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        if not self.block_out_channels:
            raise ConfigError("block_out_channels must not be empty")
        _require_at_least_one(self, "layers_per_block", "latent_channels", "norm_num_groups")
        for i, ch in enumerate(self.block_out_channels):
            require_range(f"block_out_channels[{i}]", ch, 1)
        require_positive("scaling_factor", self.scaling_factor)
        require_finite("shift_factor", self.shift_factor)
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ConfigError(f"block_out_channels entry {ch} is not divisible by norm_num_groups")


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    visual_und: bool = True
    visual_gen: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    connector_act: str = "gelu_pytorch_tanh"
    attn_backend: AttnBackend = "sdpa"
    # Detection head (UniGenDet): "ce" = 2-class softmax head as in the official code
    # (class 0 = fake, 1 = real, checkpoint compatible); "bce" = 1-logit head, the paper's BCE.
    detection_head: bool = True
    detection_loss: Literal["ce", "bce"] = "ce"
    # DIGA projector (hidden -> mult*hidden -> hidden); built only when enabled.
    diga_projector: bool = False
    diga_projector_mult: int = 4
    # "layer": torch.compile each decoder layer's computation in the packed (training) forward, the attention call
    # left eager; "none": eager. Compiling costs a minute or more per process before the first step.
    compile: Literal["none", "layer"] = "none"

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.latent_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (VAE downsample x latent patch)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def detection_num_outputs(self) -> int:
        return 2 if self.detection_loss == "ce" else 1

    def validate(self) -> None:
        if not (self.visual_und or self.visual_gen):
            raise ConfigError("at least one of visual_und / visual_gen must be true")
        _require_at_least_one(self, "latent_patch_size", "max_latent_size", "diga_projector_mult")
        if self.compile not in ("none", "layer"):
            raise ConfigError(f"compile must be 'none' or 'layer', got {self.compile!r}")


def pack_geometry(cfg: ModelConfig) -> PackGeometry:
    """The packer's view of a model: ViT patch grid and VAE latent grid limits."""
    return PackGeometry(
        vit_patch_size=cfg.vit.patch_size,
        vit_max_num_patch_per_side=cfg.vit.max_num_patch_per_side,
        latent_stride=cfg.latent_downsample,
        max_latent_size=cfg.max_latent_size,
    )
