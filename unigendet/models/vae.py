"""FLUX.1 autoencoder (frozen) on top of diffusers' ``AutoencoderKL``."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unigendet.models.config import VAEConfig
from unigendet.utils.state_dict import format_key_problems

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

# diffusers is imported inside the functions that need it: importing it costs seconds (it pulls in peft and
# every autoencoder), which modules that merely reference this file should not pay.

logger = logging.getLogger(__name__)

# Prefixes under which BFL/LDM-style files may nest the autoencoder.
_BFL_PREFIXES = ("first_stage_model.", "vae.")
_FILE_FORMAT = "unigendet.flux_vae.diffusers"


class VAEStateDictError(ValueError):
    """A VAE weight file does not match the configured geometry; the message names the offending keys."""


def build_autoencoder(cfg: VAEConfig) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` with the FLUX geometry from ``cfg`` (no quant convs, silu)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    cfg.validate()
    n_levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        # FLUX has no quant_conv / post_quant_conv; leaving them on would add random layers.
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


# --------------------------------------------------------------------------- BFL key names
_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_key_to_bfl(key: str, num_levels: int) -> str:
    """BFL/LDM name of a diffusers ``AutoencoderKL`` state-dict key (the naming of FLUX's ``ae.safetensors``),
    e.g. ``down_blocks.i.resnets.j`` -> ``down.i.block.j``, ``conv_shortcut`` -> ``nin_shortcut``, the mid
    attention's ``to_q``/``to_k``/``to_v``/``to_out.0`` -> ``q``/``k``/``v``/``proj_out``, decoder levels reversed.

    Used to check a BFL file's key set strictly *before* conversion (diffusers' converter silently drops
    keys it does not recognise) and to name offending keys in the file's own vocabulary.
    """
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise KeyError(f"not an AutoencoderKL encoder/decoder key: {key!r}")

    def resnet_tail(tail: str) -> str:
        head, _, leaf = tail.partition(".")
        return f"{_RESNET_RENAMES.get(head, head)}.{leaf}"

    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{resnet_tail(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # BFL numbers decoder levels from the lowest resolution up; diffusers from the top down.
        return f"{part}.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{resnet_tail(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{resnet_tail(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        if m[1] not in _ATTN_RENAMES:
            raise KeyError(f"unknown mid-block attention key: {key!r}")
        return f"{part}.mid.attn_1.{_ATTN_RENAMES[m[1]]}.{m[2]}"
    if re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
        return key
    raise KeyError(f"no BFL name known for diffusers key {key!r}")


def _strip_bfl_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``first_stage_model.`` / ``vae.`` prefix if every key carries it (files are all-or-nothing)."""
    for prefix in _BFL_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    prefixed = sorted(k for k in state_dict if k.startswith(_BFL_PREFIXES))
    if prefixed and len(prefixed) != len(state_dict):
        # A mixed file (e.g. a full LDM checkpoint): keep only the autoencoder part under the first prefix found.
        prefix = next(p for p in _BFL_PREFIXES if any(k.startswith(p) for k in prefixed))
        logger.info("BFL VAE file mixes prefixes; using keys under %r only", prefix)
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _forget_posteriors_on_load(module: "FluxVAE", *args, **kwargs) -> None:
    module._forget_posteriors()


class FluxVAE(nn.Module):
    """Frozen FLUX autoencoder with BAGEL's latent scaling. Always in eval mode, never trainable.

    Latent convention (BAGEL ``modeling/autoencoder.py``): ``encode`` returns ``(z - shift) * scale`` where ``z``
    is a *posterior sample* (the reference samples; ``sample=False`` gives the mean), and ``decode`` inverts it
    with ``decoder(z / scale + shift)``. Images are in [-1, 1].

    Parity note: diffusers' ``DiagonalGaussianDistribution`` clamps logvar to [-30, 20] before sampling; the
    reference does not clamp. The two differ only for extreme logvar values, which a trained VAE does not emit.

    Weights come either from the original BFL ``ae.safetensors`` (LDM naming, converted by diffusers'
    ``convert_ldm_vae_checkpoint``) or from our own file in diffusers naming (``save`` / ``load``).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self._posteriors: OrderedDict[tuple, Tensor] = OrderedDict()
        self._posterior_capacity = 0
        # New weights make every kept posterior stale; the hook also runs when a parent module loads its state
        # (and receives the module, so that a deep copy clears its own cache).
        self.register_load_state_dict_pre_hook(_forget_posteriors_on_load)

    def keep_posteriors(self, capacity: int) -> None:
        """Keep the posterior (mean and log-variance) of up to ``capacity`` images between calls to
        :meth:`encode_list`, keyed by their shape and pixel values; ``0`` turns it off.

        The autoencoder is frozen, so an image's posterior never changes: a run that sees the same images many
        times (a small dataset over many epochs) encodes each of them once. Posterior samples still draw fresh noise
        from the caller's generator in the same order, so the latents equal the uncached ones up to float rounding
        (the batch an image was first encoded in may differ). The least recently used posterior is dropped when
        the cache is full; loading weights empties it.
        """
        if capacity < 0:
            raise ValueError(f"posterior cache capacity must be >= 0, got {capacity}")
        self._posterior_capacity = capacity
        self._posteriors.clear()

    def _forget_posteriors(self) -> None:
        self._posteriors.clear()

    @staticmethod
    def _posterior_key(image: Tensor) -> tuple:
        pixels = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return tuple(image.shape), hashlib.blake2b(pixels, digest_size=16).digest()

    def _cached_posteriors(self, items: list[Tensor]) -> tuple[list[Tensor | None], list[tuple] | None]:
        """Kept posterior parameters per image (None where missing) and the images' cache keys (None when off)."""
        if not self._posterior_capacity:
            return [None] * len(items), None
        keys = [self._posterior_key(img) for img in items]
        params = []
        for key in keys:
            found = self._posteriors.get(key)
            if found is not None:
                self._posteriors.move_to_end(key)
            params.append(found)
        return params, keys

    def _remember_posterior(self, key: tuple, parameters: Tensor) -> None:
        self._posteriors[key] = parameters
        while len(self._posteriors) > self._posterior_capacity:
            self._posteriors.popitem(last=False)

    def train(self, mode: bool = True) -> "FluxVAE":
        # The VAE is a fixed feature extractor: a parent's .train() must not flip it (no dropout/BN today,
        # but diffusers' blocks check self.training in places, and eval keeps behaviour identical everywhere).
        return super().train(False)

    @property
    def scale(self) -> float:
        return self.cfg.scaling_factor

    @property
    def shift(self) -> float:
        return self.cfg.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    # ------------------------------------------------------------------ encode / decode
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        d = self.cfg.downsample
        if h % d or w % d:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE downsample factor {d}")

    def _posterior(self, images: Tensor) -> DiagonalGaussianDistribution:
        self._check_images(images)
        return self.autoencoder.encode(images.to(self.dtype)).latent_dist

    def _to_latent(self, posterior: DiagonalGaussianDistribution, generator, sample: bool) -> Tensor:
        z = posterior.sample(generator=generator) if sample else posterior.mean
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, C, H/8, W/8]`` scaled latents (posterior sample or mean)."""
        return self._to_latent(self._posterior(images), generator, sample)

    @torch.no_grad()
    def encode_list(
        self,
        images: list[Tensor],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sample: bool = True,
        max_batch: int | None = None,
    ) -> list[Tensor]:
        """Encode variable-size images ``[3, H, W]`` (or ``[1, 3, H, W]``); returns ``[C, h, w]`` in input order.

        Images are grouped by size and each group runs as one batch, without zero padding: padding would
        change every latent of the smaller images (GroupNorm statistics and the mid-block attention span the
        pad). Posterior noise is drawn per image *in input order*, so the result equals encoding each image
        alone with the same generator stream, however the images are grouped. ``generator`` may also be one
        generator per image, each image's noise then coming from its own. ``max_batch`` bounds the group batch
        size (memory).
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        items = []
        for i, img in enumerate(images):
            if img.ndim == 4 and img.shape[0] == 1:
                img = img[0]
            if img.ndim != 3:
                raise ValueError(f"images[{i}] must be [3, H, W], got {tuple(img.shape)}")
            items.append(img)
        params, keys = self._cached_posteriors(items)
        groups: "OrderedDict[tuple[int, int], list[int]]" = OrderedDict()
        for i, img in enumerate(items):
            if params[i] is None:
                groups.setdefault(tuple(img.shape[-2:]), []).append(i)

        for idx in groups.values():
            step = max_batch or len(idx)
            for s in range(0, len(idx), step):
                chunk = idx[s : s + step]
                posterior = self._posterior(torch.stack([items[i] for i in chunk]))
                for row, i in enumerate(chunk):
                    params[i] = posterior.parameters[row : row + 1]
                    if keys is not None:
                        # A copy, so that a kept row does not hold its whole batch's tensor alive.
                        self._remember_posterior(keys[i], params[i].clone())

        if isinstance(generator, Sequence):
            if len(generator) != len(items):
                raise ValueError(f"{len(generator)} generators for {len(items)} images")
            generators = list(generator)
        else:
            generators = [generator] * len(items)
        return [self._to_latent(DiagonalGaussianDistribution(p), g, sample)[0] for p, g in zip(params, generators)]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, 8h, 8w]`` in (roughly) [-1, 1], not clamped."""
        if latents.ndim != 4 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latents must be [B, {self.cfg.latent_channels}, h, w], got {tuple(latents.shape)}")
        z = latents.to(self.dtype) / self.scale + self.shift
        return self.autoencoder.decode(z).sample

    # ------------------------------------------------------------------ checkpoints
    def bfl_key_map(self) -> dict[str, str]:
        """BFL key -> diffusers key for every parameter of this model."""
        n_levels = len(self.cfg.block_out_channels)
        return {diffusers_key_to_bfl(k, n_levels): k for k in self.autoencoder.state_dict()}

    @classmethod
    def from_bfl_state_dict(cls, state_dict: dict[str, Tensor], cfg: VAEConfig, strict: bool = True) -> "FluxVAE":
        """Build from an in-memory BFL/LDM-layout state dict (see ``from_bfl_file``)."""
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        vae = cls(cfg)
        sd = _strip_bfl_prefix(state_dict)
        key_map = vae.bfl_key_map()
        missing = sorted(set(key_map) - set(sd))
        unexpected = sorted(set(sd) - set(key_map))
        if missing or unexpected:
            msg = "BFL VAE state dict does not match the VAEConfig: " + format_key_problems(missing, unexpected)
            if strict:
                raise VAEStateDictError(msg)
            logger.warning(msg)

        n_levels = len(cfg.block_out_channels)
        block_types = {
            "down_block_types": ("DownEncoderBlock2D",) * n_levels,
            "up_block_types": ("UpDecoderBlock2D",) * n_levels,
        }
        converted = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k in key_map}, block_types)
        own = vae.autoencoder.state_dict()
        bad_shapes = [
            f"{bfl} ({key_map[bfl]}): file {tuple(sd[bfl].shape)} vs model {tuple(own[key_map[bfl]].shape)}"
            for bfl in sorted(set(key_map) & set(sd))
            if key_map[bfl] in converted and converted[key_map[bfl]].shape != own[key_map[bfl]].shape
        ]
        if bad_shapes:
            raise VAEStateDictError("BFL VAE tensor shapes do not match the VAEConfig: " + "; ".join(bad_shapes[:20]))
        result = vae.autoencoder.load_state_dict(converted, strict=strict)
        if not strict and (result.missing_keys or result.unexpected_keys):
            logger.warning("non-strict VAE load: %s", format_key_problems(result.missing_keys, result.unexpected_keys))
        return vae

    @classmethod
    def from_bfl_file(cls, path: str | Path, cfg: VAEConfig, strict: bool = True) -> "FluxVAE":
        """Load the original BFL ``ae.safetensors`` (prefix-less, or under ``first_stage_model.`` / ``vae.``).

        With ``strict`` the key set must match ``cfg`` exactly; the error names missing and unexpected keys
        in BFL naming. Tensors are copied into the fp32 model; call ``.to(dtype)`` afterwards as needed.
        """
        return cls.from_bfl_state_dict(load_file(str(path)), cfg, strict=strict)

    def bfl_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in the original BFL/LDM layout (``ae.safetensors``): BFL key names, and the
        mid-block attention's q/k/v/proj_out as 1x1 convolution weights, as BFL stores them."""
        own = self.autoencoder.state_dict()
        out = {}
        for bfl, key in self.bfl_key_map().items():
            value = own[key].detach()
            if ".mid.attn_1." in bfl and ".attn_1.norm." not in bfl and bfl.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]
            out[bfl] = value.contiguous().cpu()
        return out

    def save_bfl(self, path: str | Path) -> None:
        """Write ``ae.safetensors`` in the BFL layout that BAGEL's own loader reads (inverse of ``from_bfl_file``)."""
        save_file(self.bfl_state_dict(), str(path))

    def save(self, path: str | Path) -> None:
        """Write our own safetensors file (diffusers key layout, tensors in their current dtype)."""
        sd = {k: v.detach().contiguous().cpu() for k, v in self.autoencoder.state_dict().items()}
        meta = {"format": _FILE_FORMAT, "config": json.dumps(self.cfg.__dict__)}
        save_file(sd, str(path), metadata=meta)

    @classmethod
    def from_file(cls, path: str | Path, cfg: VAEConfig) -> "FluxVAE":
        """Either layout: our own file (``save``, recognised by its metadata) or BFL's ``ae.safetensors``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VAE weights {path} not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return cls.load(path, cfg) if meta.get("format") == _FILE_FORMAT else cls.from_bfl_file(path, cfg)

    @classmethod
    def load(cls, path: str | Path, cfg: VAEConfig) -> "FluxVAE":
        """Inverse of ``save``; key set must match exactly. The model takes the file's dtype."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") not in (None, _FILE_FORMAT):
            raise ValueError(f"{path} is not a unigendet FluxVAE file (format={meta.get('format')!r})")
        sd = load_file(str(path))
        vae = cls(cfg)
        own = vae.autoencoder.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            problems = format_key_problems(missing, unexpected)
            raise VAEStateDictError(f"{path} does not match the VAEConfig: {problems}")
        dtypes = {v.dtype for v in sd.values()}
        if len(dtypes) == 1:
            vae.to(dtypes.pop())
        vae.autoencoder.load_state_dict(sd, strict=True)
        return vae
