"""Robustness perturbations (JPEG re-compression, random crop) applied to a decoded RGB image before any model
preprocessing, following the D³QE code since UniGenDet releases none. The robustness job itself is
:func:`unigendet.evaluation.jobs.run_robustness_eval`.

A crop's position depends only on the base seed, the setting name and the image's record key, so every shard
and every resumed run perturbs an image identically.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass

from PIL import Image

# The settings the UniGenDet paper reports (D³QE sweeps more).
PAPER_SETTINGS = ("none", "jpeg90", "jpeg70", "jpeg50", "crop0.9", "crop0.7", "crop0.5")
_SETTING = re.compile(r"^(?:(none)|jpeg(\d+)|crop(\d*\.?\d+))$")


@dataclass(frozen=True)
class Perturbation:
    """One setting: ``kind`` is ``none``, ``jpeg`` (``value`` = quality) or ``crop`` (``value`` = ratio)."""

    kind: str
    value: float | int | None = None

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        return f"jpeg{int(self.value)}" if self.kind == "jpeg" else f"crop{self.value:g}"

    def apply(self, image: Image.Image, key: str, base_seed: int = 0) -> Image.Image:
        """The perturbed RGB image for record ``key``."""
        if self.kind == "none":
            return image
        if self.kind == "jpeg":
            return jpeg_compress(image, int(self.value))
        rng = random.Random(perturbation_seed(base_seed, self.name, key))
        return random_crop_resize(image, float(self.value), rng)


def parse_setting(name: str) -> Perturbation:
    """``"none"``, ``"jpeg<Q>"`` (1 <= Q <= 100) or ``"crop<R>"`` (0 < R <= 1) -> :class:`Perturbation`."""
    match = _SETTING.match(name.strip().lower())
    if match is None:
        raise ValueError(f"unknown robustness setting {name!r}: expected 'none', 'jpeg<quality>' (e.g. jpeg70) "
                         f"or 'crop<ratio>' (e.g. crop0.7)")
    if match.group(1):
        return Perturbation("none")
    if match.group(2):
        quality = int(match.group(2))
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality} in {name!r}")
        return Perturbation("jpeg", quality)
    ratio = float(match.group(3))
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio} in {name!r}")
    return Perturbation("crop", ratio)


def perturbation_seed(base_seed: int, setting: str, key: str) -> int:
    """A 63-bit seed from (base seed, setting name, record key) via SHA-256: order- and shard-independent."""
    digest = hashlib.sha256(f"{int(base_seed)}|{setting}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def jpeg_compress(image: Image.Image, quality: int) -> Image.Image:
    """JPEG round trip in memory with PIL at ``quality`` (other encoder options PIL's defaults, including 4:2:0
    chroma subsampling)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="jpeg", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def random_crop_resize(image: Image.Image, ratio: float, rng: random.Random) -> Image.Image:
    """Crop ``int(h·ratio) × int(w·ratio)`` (at least 1 px) at a uniform random top-left, then resize back to
    the original ``(w, h)`` with nearest-neighbour.

    D³QE passes ``(h, w)`` to ``cv2.resize``, which reads it as width, height, so its non-square images come
    back transposed; that quirk is not reproduced.
    """
    width, height = image.size
    crop_h, crop_w = max(1, int(height * ratio)), max(1, int(width * ratio))
    top = rng.randint(0, height - crop_h)
    left = rng.randint(0, width - crop_w)
    cropped = image.crop((left, top, left + crop_w, top + crop_h))
    return cropped.resize((width, height), Image.Resampling.NEAREST)
