"""The frozen CLIP vision encoder shared by the CLIP-based detectors, with an explicit layer loop.

:class:`FrozenCLIP` wraps transformers' ``CLIPVisionModel`` (plus, when a detector needs it, CLIP's visual
projection). It never trains: parameters have ``requires_grad=False`` and the module stays in eval mode.
Besides the usual forward it exposes the pieces a detector needs to work between layers:

* :meth:`FrozenCLIP.embed` and :meth:`FrozenCLIP.layer` run the model one block at a time (embeddings ->
  ``pre_layrnorm`` -> block 1 ... block L), so hidden state ``l`` is the output of block ``l`` (0 = embeddings),
  the numbering of ``output_hidden_states``;
* :meth:`FrozenCLIP.extra_token_step` advances extra tokens through a block while CLIP's own tokens attend only
  to themselves (their values are taken from a vanilla pass, so they stay exactly the same);
* :meth:`FrozenCLIP.cls_attention` reads the CLS -> patch attention of a block.

Weights come from a local Hugging Face directory in the ``openai/clip-vit-large-patch14`` layout (a full
``CLIPModel`` or a bare vision model), from OpenAI's original ``visual.*`` state dict
(:func:`openai_visual_to_hf`), or from a seeded random initialisation of any size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from unigendet.config.loader import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Geometry fields of CLIPBackboneConfig that mirror transformers' CLIPVisionConfig.
_GEOMETRY = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
             "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "initializer_factor")


@dataclass
class CLIPBackboneConfig:
    """Where the frozen CLIP vision encoder comes from and its geometry.

    ``path``: a local directory in the Hugging Face layout (``config.json`` + weights; ``openai/clip-vit-large-
    patch14`` or a bare ``CLIPVisionModel``); its own config then defines the geometry and the fields below are
    overwritten with it when the detector is built (so a saved detector records what it ran). ``path: null``:
    random weights drawn with ``init_seed`` at the geometry below (defaults: ViT-L/14 at 224 px).
    ``initializer_factor`` scales transformers' random initialisation (larger: a more non-linear random encoder,
    useful when no weights can be downloaded). ``dtype`` is the backbone's compute precision; detector heads
    always run in float32.
    """

    path: str | None = None
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_factor: float = 1.0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_seed: int = 0

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_hidden_layers < 1:
            raise ConfigError("num_hidden_layers must be >= 1")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def vision_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**{name: getattr(self, name) for name in _GEOMETRY})

    def adopt_geometry(self, vision_config) -> None:
        """Copy the geometry of a transformers ``CLIPVisionConfig`` into this config."""
        for name in _GEOMETRY:
            setattr(self, name, getattr(vision_config, name))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report listing the text tower as unexpected; we check keys ourselves."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_hf_strict(model_cls, path: str | Path, what: str, layout: str, **kwargs):
    """``model_cls.from_pretrained(path)`` from a local directory, with every missing or mis-shaped weight a
    ConfigError naming ``backbone.path`` (never a silent random initialisation); weights the model does not use
    (a classification head, a text tower) are logged."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"backbone.path {path}: not a Hugging Face {what} directory (no config.json); expected "
                          f"{layout}")
    with _quiet_transformers():
        model, info = model_cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ConfigError(f"backbone.path {path}: weights missing for {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} ({len(missing)} keys); "
                          f"shape mismatches: {mismatched[:4]}")
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        logger.info("%s directory %s: %d weights not used (e.g. %s)", what, path, len(unexpected), unexpected[0])
    return model


class FrozenCLIP(nn.Module):
    """A frozen ``CLIPVisionModel`` (``self.vision``) and optionally CLIP's visual projection (``self.projection``)."""

    def __init__(self, vision: nn.Module, projection: nn.Linear | None = None):
        super().__init__()
        self.vision = vision
        self.projection = projection
        self.requires_grad_(False)
        self.train(False)
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def build(cls, config: CLIPBackboneConfig, with_projection: bool = False) -> FrozenCLIP:
        """From ``config.path`` (then ``config``'s geometry is updated from the directory) or random weights."""
        if config.path is None:
            backbone = cls.random(config, with_projection)
        else:
            backbone = cls.from_directory(config.path, with_projection, config.attn_implementation)
            config.adopt_geometry(backbone.vision.config)
        return backbone.to(_DTYPES[config.dtype])

    @classmethod
    def random(cls, config: CLIPBackboneConfig, with_projection: bool = False) -> FrozenCLIP:
        """Seeded random weights at ``config``'s geometry (the global RNG is left untouched)."""
        from transformers import CLIPVisionModel

        vision_config = config.vision_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            vision = CLIPVisionModel._from_config(vision_config, attn_implementation=config.attn_implementation)
            projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False) if with_projection else None
        return cls(vision, projection)

    @classmethod
    def from_directory(cls, path: str | Path, with_projection: bool = False,
                       attn_implementation: str = "sdpa") -> FrozenCLIP:
        """Load a local Hugging Face CLIP directory; missing vision (or projection) weights are an error.

        The text tower of a full ``CLIPModel`` directory is ignored (logged), never silently initialised.
        """
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        model_cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
        model = load_hf_strict(model_cls, path, "CLIP", "the openai/clip-vit-large-patch14 layout (config.json + "
                               "model.safetensors)", attn_implementation=attn_implementation)
        if with_projection:
            return cls(model.vision_model, model.visual_projection)
        return cls(model)

    def train(self, mode: bool = True) -> FrozenCLIP:
        """Always eval: the backbone is frozen, so dropout-like behaviour must never switch on."""
        return super().train(False)

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def num_layers(self) -> int:
        return len(self.vision.encoder.layers)

    @property
    def hidden_size(self) -> int:
        return self.vision.config.hidden_size

    @property
    def grid(self) -> int:
        return self.vision.config.image_size // self.vision.config.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    # ----------------------------------------------------------------------------------------------- layer loop
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Hidden state 0: patch + class embeddings with positions, after ``pre_layrnorm`` -> [B, 1+N, D]."""
        hidden = self.vision.embeddings(pixel_values.to(self.dtype))
        return self.vision.pre_layrnorm(hidden)

    def layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``index`` (1-based) applied to ``hidden``; ``attention_mask`` is additive, [B, 1, T, T]."""
        return self.vision.encoder.layers[index - 1](hidden, attention_mask)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Hidden states 0..``upto`` (default: all L+1), computed one block at a time."""
        upto = self.num_layers if upto is None else upto
        hidden = self.embed(pixel_values)
        states = [hidden]
        for index in range(1, upto + 1):
            hidden = self.layer(index, hidden)
            states.append(hidden)
        return states

    def post_layernorm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vision.post_layernorm(tokens)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            raise RuntimeError("this backbone was built without CLIP's visual projection")
        return self.projection(tokens)

    # ----------------------------------------------------------------------------------------------- attention reads
    def _heads(self, x: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)

    def cls_attention(self, index: int, hidden_in: torch.Tensor) -> torch.Tensor:
        """CLS -> patch attention probabilities of block ``index`` given its input, mean over heads -> [B, N]."""
        block = self.vision.encoder.layers[index - 1]
        attn = block.self_attn
        normed = block.layer_norm1(hidden_in)
        q = self._heads(attn.q_proj(normed[:, :1]), attn)
        k = self._heads(attn.k_proj(normed), attn)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [B, H, 1, 1+N]
        return probs[:, :, 0, 1:].mean(dim=1)

    def extra_token_step(self, index: int, context: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Block ``index`` applied to ``extra`` tokens [B, K, D] that attend to ``context`` (the block's input of
        CLS + patches, [B, 1+N, D]) and to each other, while the context tokens do not attend to them.

        Equal to running the block on ``[context, extra]`` with an additive mask that hides the extra tokens from
        the context rows (one-way attention), without recomputing the context rows: those are exactly the
        vanilla pass's.
        """
        block = self.vision.encoder.layers[index - 1]
        attn = block.self_attn
        normed_extra = block.layer_norm1(extra)
        normed_all = torch.cat([block.layer_norm1(context), normed_extra], dim=1)
        q = self._heads(attn.q_proj(normed_extra), attn)
        k = self._heads(attn.k_proj(normed_all), attn)
        v = self._heads(attn.v_proj(normed_all), attn)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32).to(q.dtype)
        mixed = (probs @ v).transpose(1, 2).reshape(extra.shape)
        hidden = extra + attn.out_proj(mixed)
        return hidden + block.mlp(block.layer_norm2(hidden))

    # ----------------------------------------------------------------------------------------------- identity
    def forget_fingerprint(self) -> None:
        """Call after changing the weights in place."""
        self._fingerprint = None

    def fingerprint(self) -> str:
        """Digest of every weight (names, shapes, dtypes, bytes); identifies the backbone in feature caches."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.state_dict())
        return self._fingerprint


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- OpenAI layout
def _openai_block_map(i: int) -> dict[str, str]:
    src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
    return {
        src + "attn.out_proj.weight": dst + "self_attn.out_proj.weight",
        src + "attn.out_proj.bias": dst + "self_attn.out_proj.bias",
        src + "ln_1.weight": dst + "layer_norm1.weight",
        src + "ln_1.bias": dst + "layer_norm1.bias",
        src + "mlp.c_fc.weight": dst + "mlp.fc1.weight",
        src + "mlp.c_fc.bias": dst + "mlp.fc1.bias",
        src + "mlp.c_proj.weight": dst + "mlp.fc2.weight",
        src + "mlp.c_proj.bias": dst + "mlp.fc2.bias",
        src + "ln_2.weight": dst + "layer_norm2.weight",
        src + "ln_2.bias": dst + "layer_norm2.bias",
    }


_OPENAI_STEM = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    start, end = prefix + "transformer.resblocks.", ".attn.in_proj_weight"
    return sum(1 for k in state if k.startswith(start) and k.endswith(end))


def openai_visual_geometry(state: dict[str, torch.Tensor], prefix: str = "visual.") -> CLIPBackboneConfig:
    """Backbone geometry read from the shapes of an OpenAI CLIP ``visual.*`` state dict (heads = width / 64,
    OpenAI's convention; QuickGELU; LayerNorm eps 1e-5)."""
    conv = state[prefix + "conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    layers = _count_blocks(state, prefix)
    grid = round((state[prefix + "positional_embedding"].shape[0] - 1) ** 0.5)
    return CLIPBackboneConfig(
        hidden_size=width, intermediate_size=state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, width // 64), image_size=grid * patch,
        patch_size=patch, projection_dim=state[prefix + "proj"].shape[1] if prefix + "proj" in state else width)


def openai_visual_to_hf(state: dict[str, torch.Tensor], prefix: str = "visual.",
                        num_layers: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Convert OpenAI CLIP vision weights (``prefix``-ed keys of the ``clip`` package) to ``CLIPVisionModel`` keys.

    ``attn.in_proj_*`` is split into q, k, v (in that order); ``proj`` [width, out] becomes the projection
    weight [out, width] (second return value; None when absent). Every key under ``prefix`` must be converted;
    a leftover or a missing one raises ValueError naming it.
    """
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if num_layers is None:
        num_layers = _count_blocks(sub, "")
    out: dict[str, torch.Tensor] = {}
    expected = dict(_OPENAI_STEM)
    for i in range(num_layers):
        expected.update(_openai_block_map(i))
    missing = [prefix + k for k in expected if k not in sub]
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            key = f"transformer.resblocks.{i}.attn.in_proj_{kind}"
            if key not in sub:
                missing.append(prefix + key)
                continue
            for name, part in zip(("q_proj", "k_proj", "v_proj"), sub[key].chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = part.clone()
    if missing:
        raise ValueError(f"OpenAI CLIP weights incomplete: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for src, dst in expected.items():
        out[dst] = sub[src]
    projection = sub["proj"].t().contiguous() if "proj" in sub else None
    used = set(expected) | {"proj"} | {f"transformer.resblocks.{i}.attn.in_proj_{k}"
                                       for i in range(num_layers) for k in ("weight", "bias")}
    leftover = sorted(prefix + k for k in sub if k not in used)
    if leftover:
        raise ValueError(f"OpenAI CLIP weights: unexpected keys {leftover[:8]}{' ...' if len(leftover) > 8 else ''}")
    return out, projection
