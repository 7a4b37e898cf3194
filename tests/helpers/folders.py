"""Synthetic detector data on disk: images with a learnable artefact, written in dataset folder layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def checkerboard_image(rng: np.random.Generator, fake: bool, size: int = 32) -> Image.Image:
    """A smooth colour field; fakes add a period-2 checkerboard (a strong high-frequency spectral peak)."""
    small = rng.normal(0.5, 0.15, (4, 4, 3)).clip(0, 1)
    field = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), float)
    if fake:
        yy, xx = np.mgrid[0:size, 0:size]
        field = field + 25.0 * np.where((yy + xx) % 2 == 0, 1.0, -1.0)[..., None]
    return Image.fromarray(field.clip(0, 255).astype(np.uint8))


def write_genimage(root: Path, make_image: Callable[[np.random.Generator, bool], Image.Image],
                   counts: dict[str, int], generator: str = "toygen", seed: int = 0) -> Path:
    """``<root>/<generator>/<split>/{ai,nature}/NNN.png`` with ``counts[split]`` fakes and as many reals."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for folder, fake in (("ai", True), ("nature", False)):
            directory = root / generator / split / folder
            directory.mkdir(parents=True)
            for i in range(count):
                make_image(rng, fake).save(directory / f"{i:03d}.png")
    return root
