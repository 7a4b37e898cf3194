"""Text-to-image generation with BAGEL's sampler: Euler steps of the rectified flow from noise (t = 1) to data
(t = 0), with classifier-free guidance from separate conditional, text-unconditional and image-unconditional
KV caches. An image depends only on its prompt and seed, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from PIL import Image

from unigendet.data.packing import TextItem, VAEImage
from unigendet.data.tokenizer import encode_text, special_token_ids
from unigendet.data.transforms import unpatchify_latent
from unigendet.inference.cache import KVCache
from unigendet.inference.cached_forward import CachedForward

RenormType = Literal["global", "channel", "text_channel", "none"]
RENORM_TYPES = ("global", "channel", "text_channel", "none")
# Image side in pixels (height and width) when the caller gives none: BAGEL's generation size.
DEFAULT_IMAGE_SIZE = 1024


def flow_schedule(num_steps: int, timestep_shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_k, Δ_k) for k = 0..N−2 of the shifted ``linspace(1, 0, N)`` (fp32, as the reference).

    ``τ = linspace(1, 0, N)`` is shifted to ``σ = s·τ / (1 + (s−1)·τ)``; the sampler steps
    ``x ← x − v(x, σ_k)·(σ_k − σ_{k+1})``, N−1 model evaluations per branch. Time runs from noise to data, the
    training convention ``x_t = (1−t)·x0 + t·ε``, ``v ≈ ε − x0``.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (N-1 Euler steps), got {num_steps}")
    tau = torch.linspace(1, 0, num_steps)
    sigma = timestep_shift * tau / (1 + (timestep_shift - 1) * tau)
    return sigma[:-1], sigma[:-1] - sigma[1:]


def _renorm_factor(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, minimum: float) -> torch.Tensor:
    if per_token:
        ratio = reference.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    else:
        ratio = reference.norm() / (guided.norm() + 1e-8)
    return ratio.clamp(min=minimum, max=1.0)


def combine_cfg(
    v_cond: torch.Tensor,
    v_text_uncond: torch.Tensor,
    v_img_uncond: torch.Tensor | None,
    cfg_text_scale: float,
    cfg_img_scale: float,
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Guided velocity of **one image** (tokens ``[n, C]``). ``v_img_uncond`` is needed iff
    ``cfg_img_scale > 1``.

    ``v_t' = u_t + s_txt·(v_c − u_t)``; if ``s_img > 1``, ``v' = u_i + s_img·(v_t' − u_i)``. Renormalisation
    scales by ``r = ‖v_c‖ / (‖v'‖ + 1e-8)`` clamped to ``[renorm_min, 1]``: ``global`` over all tokens and
    channels of the image (BAGEL takes one norm over the whole packed batch, which is right only for batch 1),
    ``channel`` per token, ``text_channel`` per token on ``v_t'`` before the image step and none after;
    ``none`` skips it (plain CFG).
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    use_img = cfg_img_scale > 1.0
    if use_img and v_img_uncond is None:
        raise ValueError("cfg_img_scale > 1 needs the image-unconditional velocity")
    text_guided = v_text_uncond + cfg_text_scale * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        text_guided = text_guided * _renorm_factor(v_cond, text_guided, True, renorm_min)
        return v_img_uncond + cfg_img_scale * (text_guided - v_img_uncond) if use_img else text_guided
    guided = v_img_uncond + cfg_img_scale * (text_guided - v_img_uncond) if use_img else text_guided
    if renorm_type == "none":
        return guided
    return guided * _renorm_factor(v_cond, guided, renorm_type == "channel", renorm_min)


@dataclass
class SamplerSettings:
    """The flow sampler and its guidance; the defaults are BAGEL's ``gen_image`` settings with image CFG off
    (the offline evaluations' setting; the FID/GenEval scripts guide the whole schedule, ``cfg_interval=(0, 1)``).

    ``num_steps`` N: points of the time grid (N-1 Euler steps); ``timestep_shift``: the grid's shift ``s``;
    ``cfg_text_scale`` / ``cfg_img_scale``: guidance scales (1 = off); ``cfg_interval`` ``(lo, hi)``: guide
    only at times ``lo < t <= hi``; ``cfg_renorm_type`` / ``cfg_renorm_min``: see :func:`combine_cfg`.
    """

    num_steps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: RenormType = "global"
    cfg_renorm_min: float = 0.0

    def __post_init__(self) -> None:
        self.cfg_interval = tuple(float(v) for v in self.cfg_interval)
        self.validate()

    def validate(self) -> None:
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 (N-1 Euler steps), got {self.num_steps}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        lo, hi = self.cfg_interval
        if lo > hi:
            raise ValueError(f"cfg_interval must be (lo, hi) with lo <= hi, got {self.cfg_interval}")


class CFGContext:
    """The three caches classifier-free guidance reads (conditional, text-unconditional, image-unconditional),
    built while a context is added item by item (batch of sequences).

    * text: the text-unconditional cache becomes a copy of the conditional one *before* the text is
      added; the text is added to the conditional and the image-unconditional caches;
    * image (clean VAE and/or ViT blocks): added to the conditional cache only; the
      text-unconditional cache is re-copied from it afterwards.

    ``caches()`` returns ``(cond, text_uncond, img_uncond)`` with ``img_uncond = None`` when no image
    was added (it would equal ``cond``; the sampler then reuses the conditional velocity). For plain
    text-to-image the text-unconditional cache is empty, so the image sits at RoPE 0, exactly like a training
    sample whose caption was dropped."""

    def __init__(self, cached_forward: CachedForward, batch_size: int):
        self.cached_forward = cached_forward
        self.cond = cached_forward.new_cache(batch_size)
        self.text_uncond = cached_forward.new_cache(batch_size)
        # Until the first image, the image-unconditional cache is the conditional one: not materialised.
        self.img_uncond: KVCache | None = None

    @property
    def has_images(self) -> bool:
        return self.img_uncond is not None

    def add_text(self, ids: Sequence[Sequence[int]]) -> None:
        """One text segment ``<|im_start|> ids <|im_end|>`` per sequence."""
        block = self.cached_forward.embed(self.cached_forward.pack([[TextItem(list(t))] for t in ids]))
        self.text_uncond = self.cond.clone()
        self.cached_forward.forward(self.cond, block, commit=True)
        if self.img_uncond is not None:
            self.cached_forward.forward(self.img_uncond, block, commit=True)

    def add_images(self, plans: Sequence[Sequence], latent_tokens: torch.Tensor | None = None) -> None:
        """Image blocks per sequence (clean ``VAEImage`` and/or ``ViTImage`` items); ``latent_tokens``
        are the patchified clean latents of the VAE items in order."""
        batch = self.cached_forward.pack([list(p) for p in plans])
        timesteps = None if latent_tokens is None else torch.zeros(latent_tokens.shape[0], device=self.cached_forward.device)
        block = self.cached_forward.embed(batch, latent_tokens, timesteps)
        if self.img_uncond is None:
            self.img_uncond = self.cond.clone()
        self.cached_forward.forward(self.cond, block, commit=True)
        self.text_uncond = self.cond.clone()

    def caches(self) -> tuple[KVCache, KVCache, KVCache | None]:
        return self.cond, self.text_uncond, self.img_uncond


class FlowSampler:
    """Euler sampling of image blocks against prepared caches (conditional / text-unconditional /
    image-unconditional). Works for any context; :class:`Generator` builds the text-to-image one."""

    def __init__(self, cached_forward: CachedForward):
        self.cached_forward = cached_forward
        self.config = cached_forward.config

    def _image_block(self, shapes: Sequence[tuple[int, int]]):
        """The packed image block (markers + latents, noise split) for token grids ``shapes``."""
        stride = self.config.latent_downsample
        # The packer reads only the image size; an expanded scalar costs no memory.
        plans = [[VAEImage(torch.zeros(()).expand(3, h * stride, w * stride), noised=True)] for h, w in shapes]
        return self.cached_forward.pack(plans)

    @torch.no_grad()
    def sample(
        self,
        cond: KVCache,
        text_uncond: KVCache,
        img_uncond: KVCache | None,
        noise: Sequence[torch.Tensor],
        shapes: Sequence[tuple[int, int]],
        settings: SamplerSettings,
    ) -> list[torch.Tensor]:
        """Denoise ``noise[i] [h_i·w_i, C]`` (token grid ``shapes[i]``) -> clean latent tokens per image.

        The image block (``<|vision_start|>``, h·w latent tokens, ``<|vision_end|>``, all at the cache's RoPE
        id) attends to the context and itself and is never added to a cache. Guidance applies at step k only
        when the text scale is > 1 and ``lo < σ_k ≤ hi`` (``cfg_interval``), as in BAGEL; otherwise only the
        conditional branch runs. The branches reuse one query block, tiled along the batch, so all images and
        branches run as one forward.

        ``img_uncond=None`` means "the same as ``cond``" (text-only context): ``u_i = v_c``. ``cfg_img_scale > 1``
        is then not a no-op but an effective text scale of ``1 + s_img·(s_txt − 1)`` before renorm (BAGEL's
        demo settings 4.0 / 1.5 give 5.5)."""
        fwd = self.cached_forward
        n = len(noise)
        if not (cond.batch_size == text_uncond.batch_size == n == len(shapes)):
            raise ValueError("caches, noise and shapes must have one entry per image")
        if img_uncond is not None and img_uncond.batch_size != n:
            raise ValueError("img_uncond must have one sequence per image")
        batch = self._image_block(shapes)
        counts = [h * w for h, w in shapes]
        block_lens = torch.tensor([c + 2 for c in counts])
        x = torch.cat([z.float() for z in noise]).to(fwd.device)

        s_txt, s_img = settings.cfg_text_scale, settings.cfg_img_scale
        guided_possible = s_txt > 1.0
        separate_img = guided_possible and s_img > 1.0 and img_uncond is not None
        # Branch caches are built once (lazily); the image block's slots are reserved so no step reallocates.
        cond_only = branches = None

        timesteps, dts = flow_schedule(settings.num_steps, settings.timestep_shift)
        lo, hi = settings.cfg_interval
        for t, dt in zip(timesteps.tolist(), dts.tolist()):
            guided = guided_possible and lo < t <= hi
            t_tok = torch.full((x.shape[0],), t, device=fwd.device)
            block = fwd.embed(batch, x, t_tok)
            if not guided:
                if cond_only is None:
                    cond_only = cond.clone()
                    cond_only.reserve(int((cond_only.lengths + block_lens).max()))
                v = fwd.velocity(fwd.forward(cond_only, block, commit=False), block).float()
            else:
                k = 3 if separate_img else 2
                if branches is None:
                    branches = KVCache.cat([cond, text_uncond] + ([img_uncond] if separate_img else []))
                    branches.reserve(int((branches.lengths + block_lens.repeat(k)).max()))
                tiled = block.tile(k)
                out = fwd.velocity(fwd.forward(branches, tiled, commit=False), tiled).float()
                per_branch = out.split(x.shape[0])
                v_c, u_t = per_branch[0], per_branch[1]
                u_i = per_branch[2] if separate_img else v_c
                pieces = []
                for vc, ut, ui in zip(v_c.split(counts), u_t.split(counts), u_i.split(counts)):
                    pieces.append(combine_cfg(vc, ut, ui, s_txt, s_img, settings.cfg_renorm_type, settings.cfg_renorm_min))
                v = torch.cat(pieces)
            x = x - v * dt
        return list(x.split(counts))


class Generator:
    """``Generator(model, vae, tokenizer).generate(prompts, height, width)`` -> PIL images."""

    def __init__(self, model, vae, tokenizer):
        self.model = model.eval()
        self.vae = vae
        self.tokenizer = tokenizer
        self.cached_forward = CachedForward(model, special_token_ids(tokenizer))
        self.sampler = FlowSampler(self.cached_forward)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        stride, side = self.model.config.latent_downsample, self.model.config.max_latent_size
        if height % stride or width % stride or height < stride or width < stride:
            raise ValueError(f"height and width must be positive multiples of {stride} px, got {height}x{width}")
        h, w = height // stride, width // stride
        if h > side or w > side:
            raise ValueError(f"{height}x{width} exceeds the latent position table ({side * stride} px per side)")
        return h, w

    @torch.no_grad()
    def generate_latents(
        self,
        prompts: Sequence[str],
        height: int = DEFAULT_IMAGE_SIZE,
        width: int = DEFAULT_IMAGE_SIZE,
        seed: int | Sequence[int] = 0,
        settings: SamplerSettings | None = None,
    ) -> list[torch.Tensor]:
        """Clean latent tokens ``[h·w, C]`` per prompt (before the VAE decode).

        Image ``i`` draws its initial noise from a CPU generator seeded with ``seeds[i]`` (an int ``seed`` means
        ``seed + i``)."""
        prompts = list(prompts)
        if not prompts:
            return []
        settings = settings or SamplerSettings()
        seeds = [int(seed) + i for i in range(len(prompts))] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        h, w = self._grid(height, width)
        context = CFGContext(self.cached_forward, len(prompts))
        # Text-to-image: the text-unconditional cache stays empty (the image sits at RoPE 0) and the
        # image-unconditional one equals the conditional one (no images in the context).
        context.add_text([encode_text(self.tokenizer, p) for p in prompts])
        dim = self.model.config.patch_latent_dim
        noise = [torch.randn(h * w, dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return self.sampler.sample(*context.caches(), noise, [(h, w)] * len(prompts), settings)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, h: int, w: int) -> Image.Image:
        """Latent tokens of one image -> uint8 RGB PIL image (clamp to [0, 1], x255, truncate)."""
        cfg = self.model.config
        z = unpatchify_latent(tokens.float(), h, w, cfg.latent_patch_size, cfg.latent_channels)
        vae_param = next(self.vae.parameters())
        pixels = self.vae.decode(z[None].to(vae_param.device, vae_param.dtype))[0].float()
        array = ((pixels + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    def generate(
        self,
        prompts: Sequence[str],
        height: int = DEFAULT_IMAGE_SIZE,
        width: int = DEFAULT_IMAGE_SIZE,
        seed: int | Sequence[int] = 0,
        settings: SamplerSettings | None = None,
        **overrides,
    ) -> list[Image.Image]:
        """One image per prompt, sampled with ``settings`` (default :class:`SamplerSettings`) with the fields
        named in ``overrides`` replaced (e.g. ``num_steps=20``)."""
        settings = replace(settings or SamplerSettings(), **overrides)
        latents = self.generate_latents(prompts, height, width, seed, settings)
        h, w = self._grid(height, width)
        return [self.decode(z, h, w) for z in latents]
