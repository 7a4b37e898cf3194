"""Regions and self-blended counterparts for CoRIT.

Regions start from a *hull*: a binary pixel mask of the foreground (for faces, the convex hull of the
landmarks; otherwise a mask supplied with the data, the most CLS-attended tokens of a CLIP layer, or a centred
ellipse). The hull gives a disjoint pixel partition: foreground F = erode(hull), boundary Bd = dilate(hull) -
erode(hull) (about two patches wide with the default radius of one patch), background Bg = the rest. A token
belongs to a region when at least half of its pixels do (exact halves go to the earlier region).

The self-blended image (SBI) of x blends x with a colour/sharpness/geometry-jittered copy of itself inside a
randomly grown or shrunk, blurred hull, with a random blend ratio. Its randomness comes from a per-image seed
(a hash of the image), so an image always gets the same counterpart and its features can be cached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from unigendet.config.loader import ConfigError

REGION_NAMES = ("F", "Bd", "Bg")


# ---------------------------------------------------------------------------------------------- hulls
def convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull of 2-D points [M, 2] (x, y), counter-clockwise (monotone chain)."""
    pts = sorted({(float(x), float(y)) for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2)})
    if len(pts) <= 2:
        return np.asarray(pts)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(reversed(pts))
    return np.asarray(lower[:-1] + upper[:-1])


def landmark_hull_mask(landmarks: np.ndarray, width: int, height: int) -> Image.Image:
    """Filled convex hull of facial landmarks ([M, 2] pixel coordinates x, y) as an "L" mask of the image size."""
    mask = Image.new("L", (width, height), 0)
    hull = convex_hull(landmarks)
    if len(hull) >= 3:
        ImageDraw.Draw(mask).polygon([tuple(p) for p in hull], fill=255)
    return mask


def ellipse_hull(size: int) -> torch.Tensor:
    """A centred ellipse (semi-axes 0.35 and 0.42 of the side) as a [1, size, size] 0/1 mask."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return (((xx / 0.35) ** 2 + (yy / 0.42) ** 2) <= 1.0).float()[None]


def saliency_hull(attention: torch.Tensor, grid: int, size: int, top_fraction: float) -> torch.Tensor:
    """The ``top_fraction`` most CLS-attended tokens ([B, N] attention) as pixel hulls [B, 1, size, size]."""
    b, n = attention.shape
    keep = max(1, math.ceil(top_fraction * n))
    top = attention.topk(keep, dim=-1).indices
    tokens = torch.zeros(b, n, device=attention.device).scatter_(1, top, 1.0)
    return F.interpolate(tokens.view(b, 1, grid, grid), size=(size, size), mode="nearest")


# ---------------------------------------------------------------------------------------------- partitions
def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of [B, 1, H, W] masks by a (2r+1)^2 square."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion by a (2r+1)^2 square; the image border does not erode (a face may touch it)."""
    if radius <= 0:
        return mask
    return 1.0 - dilate(1.0 - mask, radius)


def partition_from_hull(hull: torch.Tensor, radius: int) -> torch.Tensor:
    """[B, 1, H, W] hulls -> [B, 3, H, W] disjoint pixel masks (F, Bd, Bg)."""
    inner = erode(hull, radius)
    outer = dilate(hull, radius)
    return torch.cat([inner, outer - inner, 1.0 - outer], dim=1)


def token_membership(pixel_masks: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, K, H, W] pixel masks -> [B, K, N] bool: token i is in region k if >= 50 % of its pixels are.

    A token split exactly half and half goes to the first of the two regions (F before Bd before Bg), so the
    regions stay disjoint.
    """
    share = F.avg_pool2d(pixel_masks.float(), patch, stride=patch).flatten(2)
    best = F.one_hot(share.argmax(dim=1), share.shape[1]).permute(0, 2, 1).bool()
    return best & (share >= 0.5)


def random_membership(seeds: Sequence[int], regions: int, tokens: int) -> torch.Tensor:
    """Each token in one of ``regions`` groups, drawn per image from its seed -> [B, K, N] bool."""
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        group = torch.randint(0, regions, (tokens,), generator=generator)
        rows.append(F.one_hot(group, regions).T.bool())
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- self-blending
@dataclass
class SBIConfig:
    """Self-blended counterpart. Jitters are uniform in [-j, j] (contrast and scale: 1 +- j); the hull grows or
    shrinks by up to ``mask_radius`` of the side and is blurred with sigma in ``mask_blur`` (fractions of the side)."""

    blend_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    brightness: float = 0.1
    contrast: float = 0.1
    channel_shift: float = 0.05
    scale: float = 0.05
    shift: float = 0.03
    mask_radius: float = 0.03
    mask_blur: list[float] = field(default_factory=lambda: [0.01, 0.03])

    def validate(self) -> None:
        if not self.blend_ratios or any(not 0.0 < r <= 1.0 for r in self.blend_ratios):
            raise ConfigError(f"sbi.blend_ratios must be non-empty values in (0, 1], got {self.blend_ratios}")
        if len(self.mask_blur) != 2 or not 0.0 <= self.mask_blur[0] <= self.mask_blur[1]:
            raise ConfigError(f"sbi.mask_blur must be [low, high] with 0 <= low <= high, got {self.mask_blur}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] (reflect padding)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _jittered_copy(image: torch.Tensor, cfg: SBIConfig, generator: torch.Generator) -> torch.Tensor:
    """Colour, sharpness and small scale/shift jitter of one [3, H, W] image in [0, 1]."""
    mean = image.mean()
    shift = torch.tensor([_uniform(generator, -cfg.channel_shift, cfg.channel_shift) for _ in range(3)],
                         dtype=image.dtype, device=image.device).view(3, 1, 1)
    out = (image - mean) * _uniform(generator, 1 - cfg.contrast, 1 + cfg.contrast) + mean
    out = (out + _uniform(generator, -cfg.brightness, cfg.brightness) + shift).clamp(0, 1)
    blurred = gaussian_blur(out[None], 1.0)[0]
    amount = _uniform(generator, -1.0, 1.0)  # < 0 blurs, > 0 sharpens
    out = (out + amount * (out - blurred)).clamp(0, 1)
    scale = _uniform(generator, 1 - cfg.scale, 1 + cfg.scale)
    tx, ty = (_uniform(generator, -cfg.shift, cfg.shift) * 2 for _ in range(2))
    theta = torch.tensor([[1 / scale, 0, tx], [0, 1 / scale, ty]], dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta[None], [1, *out.shape], align_corners=False)
    return F.grid_sample(out[None], grid, padding_mode="border", align_corners=False)[0]


def _deformed_mask(hull: torch.Tensor, cfg: SBIConfig, generator: torch.Generator) -> torch.Tensor:
    """One [1, H, W] hull grown or shrunk at random, blurred, rescaled to peak 1."""
    side = hull.shape[-1]
    limit = max(1, round(cfg.mask_radius * side))
    radius = int(torch.randint(-limit, limit + 1, (), generator=generator))
    mask = dilate(hull[None], radius) if radius >= 0 else erode(hull[None], -radius)
    if mask.sum() == 0:
        mask = hull[None]
    mask = gaussian_blur(mask, _uniform(generator, cfg.mask_blur[0], cfg.mask_blur[1]) * side)[0]
    peak = mask.max()
    return mask / peak if peak > 0 else mask


def self_blend(pixels: torch.Tensor, hulls: torch.Tensor, seeds: Sequence[int], cfg: SBIConfig) -> torch.Tensor:
    """Self-blended counterparts of [B, 3, H, W] images in [0, 1] inside their [B, 1, H, W] hulls.

    Image b is drawn with ``torch.Generator().manual_seed(seeds[b])``; an empty hull gives the image itself.
    """
    out = []
    for image, hull, seed in zip(pixels, hulls, seeds):
        if hull.sum() == 0:
            out.append(image)
            continue
        generator = torch.Generator().manual_seed(int(seed))
        copy = _jittered_copy(image, cfg, generator)
        mask = _deformed_mask(hull, cfg, generator)
        ratio = cfg.blend_ratios[int(torch.randint(0, len(cfg.blend_ratios), (), generator=generator))]
        out.append(image + ratio * mask * (copy - image))
    return torch.stack(out)
