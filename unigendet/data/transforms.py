"""Image preprocessing and patch layouts shared by the ViT (understanding) and VAE (generation) paths.

The resize rule reproduces BAGEL's ``MaxLongEdgeMinShortEdgeResize`` bit for bit (same float
expressions, Python's banker's-rounding ``round``), because the resulting size decides the number of
tokens, the position ids and therefore everything downstream; a one-stride difference changes the
sequence layout.

Resampling: PIL bicubic (``Image.Resampling.BICUBIC``). This is what the reference gets too: torchvision's
``F.resize`` on a PIL image delegates to ``PIL.Image.resize``, whose bicubic filter widens its support when
downsampling (i.e. it antialiases), so the ``antialias=True`` flag of the reference is implicit here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from unigendet.data.images import to_rgb

logger = logging.getLogger(__name__)

# BAGEL's pixel budgets: the ImageTransform default (14·14·9·1024), and the ViT budget of UniGenDet's GDUF recipe.
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336
GDUF_VIT_MAX_PIXELS = 2_007_040


def _snap(side: int, scale: float, stride: int) -> int:
    """``max(stride, round(round(side * scale) / stride) * stride)`` — rounds twice, as the reference."""
    return max(stride, int(round(round(side * scale) / stride) * stride))


def resize_target_size(
    width: int,
    height: int,
    max_size: int,
    min_size: int,
    stride: int,
    max_pixels: int,
    img_num: int = 1,
) -> tuple[int, int]:
    """Output ``(width, height)`` of BAGEL's MaxLongEdgeMinShortEdgeResize for a ``width x height`` image.

    ``img_num`` divides the pixel budget (the reference's multi-image option; always 1 in practice).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if min(max_size, min_size, stride, max_pixels, img_num) < 1:
        raise ValueError("max_size, min_size, stride, max_pixels and img_num must be positive")

    # Step 1: shrink so the long edge fits max_size (never enlarge for that), but enlarge if needed so the
    # short edge reaches min_size -- the min_size rule wins, so the long edge may now exceed max_size.
    # Each side is rounded to a pixel, then to the nearest multiple of stride (at least one stride).
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_w, new_h = _snap(width, scale, stride), _snap(height, scale, stride)

    # Step 2: pixel budget. The reference multiplies *each side* by the area ratio (not its square
    # root), so the area shrinks by the ratio squared; kept as is for parity. Only reachable with
    # extreme aspect ratios at the stock settings.
    if new_w * new_h > max_pixels / img_num:
        scale = max_pixels / img_num / (new_w * new_h)
        new_w, new_h = _snap(new_w, scale, stride), _snap(new_h, scale, stride)

    # Step 3: if step 1's min_size enlargement pushed the long edge past max_size, scale it back to
    # max_size (the short edge then ends below min_size; max_size wins at the end).
    if max(new_w, new_h) > max_size:
        scale = max_size / max(new_w, new_h)
        new_w, new_h = _snap(new_w, scale, stride), _snap(new_h, scale, stride)

    return new_w, new_h


def pil_to_tensor01(img: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1], the same arithmetic as torchvision's ``ToTensor`` (uint8 / 255)."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div(255)


@dataclass(frozen=True)
class ImageTransform:
    """Resize (:func:`resize_target_size`, PIL bicubic) → ``[3, H, W]`` float32 normalised to [-1, 1] by
    ``(x - 0.5) / 0.5``."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if min(self.max_size, self.min_size, self.stride, self.max_pixels) < 1:
            raise ValueError(f"ImageTransform fields must be positive: {self}")

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        return resize_target_size(
            width, height, self.max_size, self.min_size, self.stride, self.max_pixels, img_num=img_num
        )

    def resize(self, img: Image.Image, img_num: int = 1) -> Image.Image:
        """The resized RGB PIL image (also what DIGA's teacher and the demo display)."""
        img = to_rgb(img) if img.mode != "RGB" else img
        size = self.target_size(*img.size, img_num=img_num)
        if size == img.size:
            # PIL's resize to the same size is an exact copy; skip the work.
            return img.copy()
        return img.resize(size, Image.Resampling.BICUBIC)

    def __call__(self, img: Image.Image, img_num: int = 1) -> torch.Tensor:
        x = pil_to_tensor01(self.resize(img, img_num=img_num))
        return x.sub_(0.5).div_(0.5)


def vae_transform(
    max_size: int = 1024, min_size: int = 512, stride: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageTransform:
    """VAE-side transform (generation targets, clean VAE context); stride = 8 (VAE) x 2 (latent patch)."""
    return ImageTransform(max_size, min_size, stride, max_pixels)


def vit_transform(
    max_size: int = 980, min_size: int = 224, stride: int = 14, max_pixels: int = GDUF_VIT_MAX_PIXELS
) -> ImageTransform:
    """ViT-side transform. The default pixel budget is GDUF training's; the reference's inference/DIGA
    teacher use ``DEFAULT_MAX_PIXELS``, which only matters for extreme aspect ratios."""
    return ImageTransform(max_size, min_size, stride, max_pixels)


VAE_TRANSFORM = vae_transform()
VIT_TRANSFORM = vit_transform()


def _grid_patchify(x: torch.Tensor, p: int, what: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{what}: expected [C, H, W], got shape {tuple(x.shape)}")
    if p < 1:
        raise ValueError(f"{what}: patch size must be positive, got {p}")
    c, height, width = x.shape
    if height % p or width % p:
        raise ValueError(f"{what}: size {height}x{width} is not divisible by patch size {p}")
    h, w = height // p, width // p
    # [C, h, p, w, p] -> [h, w, p(row), p(col), C]: grid row-major, then pixel row, pixel col, channel.
    return x.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``[3, H, W]`` → ``[(H/p)·(W/p), p·p·3]``; the row layout SigLIP's linear patch embedding expects."""
    return _grid_patchify(image, patch, "patchify")


def patchify_latent(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """VAE latent ``[C, p·h, p·w]`` → ``[h·w, p·p·C]`` (row in p×p, col in p×p, channel)."""
    return _grid_patchify(latent, p, "patchify_latent")


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Exact inverse of :func:`patchify_latent`: ``[h·w, p·p·C]`` → ``[C, p·h, p·w]``."""
    if tokens.shape != (h * w, p * p * c):
        raise ValueError(f"unpatchify_latent: expected shape {(h * w, p * p * c)}, got {tuple(tokens.shape)}")
    return tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


def flat_position_ids(h: int, w: int, max_side: int) -> torch.Tensor:
    """``row·max_side + col`` for an ``h x w`` grid, row-major (indexes fixed ``max_side²`` tables).

    The tables are never interpolated: a smaller grid uses their top-left corner, so a grid larger than
    ``max_side`` has no valid ids and is rejected rather than wrapping into the next row.
    """
    if h < 1 or w < 1:
        raise ValueError(f"grid size must be positive, got {h}x{w}")
    if h > max_side or w > max_side:
        raise ValueError(f"grid {h}x{w} exceeds the position table side {max_side}")
    rows = torch.arange(h, dtype=torch.long)
    cols = torch.arange(w, dtype=torch.long)
    return (rows[:, None] * max_side + cols[None, :]).reshape(-1)
