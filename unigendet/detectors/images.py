"""Image preparation shared by the detectors: resize, crop, flip, tensor conversion and content hashing.

Everything works on PIL images and returns float32 tensors in ``[0, 1]``; each detector normalises inside its
own forward pass, so a batch holds plain pixels. Random augmentation draws from torch's global generator, so a
training run that restores the RNG state replays the same crops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from unigendet.config.loader import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass
class ImagePrepConfig:
    """How an image becomes a square crop of the backbone's input size.

    Evaluation: optional resize of the shorter side to ``resize`` pixels, then a centre crop (zero padding where
    the image is smaller than the crop). Training: shorter side to ``train_resize`` (None: native size), then a
    random crop (``train_random_crop``) or a centre crop, and a random horizontal flip (``train_hflip``).
    """

    resize: int | None = None
    train_resize: int | None = None
    resample: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    train_random_crop: bool = False
    train_hflip: bool = False
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    def validate(self) -> None:
        for name in ("resize", "train_resize"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive number of pixels or null, got {value}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std need one value per RGB channel")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {self.std}")

    def random_at_train(self) -> bool:
        """Whether training-time preparation draws random numbers (then per-image features are not reusable)."""
        return self.train_random_crop or self.train_hflip


def to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter(image: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """Resize so that the shorter side is ``size`` pixels, keeping the aspect ratio."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(new, _RESAMPLE[resample])


def crop_box_centre(width: int, height: int, size: int) -> tuple[int, int]:
    """Top-left corner of a centred ``size`` crop (negative where the image is smaller: padding)."""
    return (width - size) // 2, (height - size) // 2


def crop(image: Image.Image, left: int, top: int, size: int) -> Image.Image:
    """A ``size`` square at (left, top); parts outside the image are zero (black), as torchvision pads."""
    return image.crop((left, top, left + size, top + size))


def random_crop_corner(width: int, height: int, size: int) -> tuple[int, int]:
    """Top-left corner of a uniformly drawn crop (torch's global RNG); centred along a side that is too short."""
    left = int(torch.randint(0, width - size + 1, ()).item()) if width > size else (width - size) // 2
    top = int(torch.randint(0, height - size + 1, ()).item()) if height > size else (height - size) // 2
    return left, top


def prepare_square(image: Image.Image, size: int, cfg: ImagePrepConfig, train: bool = False,
                   resample: str | None = None) -> Image.Image:
    """Resize/crop/flip ``image`` to a ``size`` square as ``cfg`` says (``resample`` overrides, e.g. for masks)."""
    method = resample or cfg.resample
    target = cfg.train_resize if train else cfg.resize
    if target is not None:
        image = resize_shorter(image, target, method)
    w, h = image.size
    if train and cfg.train_random_crop:
        left, top = random_crop_corner(w, h, size)
    else:
        left, top = crop_box_centre(w, h, size)
    image = crop(image, left, top, size)
    if train and cfg.train_hflip and bool(torch.rand(()) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def to_tensor01(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Binary mask (mode "L", "1" or any; > 0 = inside) -> float32 tensor [1, H, W] of 0/1."""
    array = np.asarray(mask.convert("L")) > 0
    return torch.from_numpy(array.astype(np.float32))[None]


def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """[B, 3, H, W] pixels in [0, 1] -> (pixels - mean) / std per channel."""
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - m) / s


def content_hash(image: Image.Image, *extras: Any) -> str:
    """Hex digest of the decoded pixels (mode, size, bytes) plus any extra per-image inputs (masks, landmarks).

    Two files with the same pixels hash the same; re-encoding a lossy file does not.
    """
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    for extra in extras:
        digest.update(b"|")
        if extra is None:
            digest.update(b"none")
        elif isinstance(extra, Image.Image):
            digest.update(f"{extra.mode}:{extra.size}".encode())
            digest.update(extra.tobytes())
        else:
            array = np.ascontiguousarray(np.asarray(extra))
            digest.update(f"{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def seed_from_hash(digest: str) -> int:
    """A 63-bit seed from a content hash (per-image deterministic randomness)."""
    return int(digest[:15], 16)
