"""Stages with scores chosen by the test (read from each image's ``info``) and call counters, and small images."""

from __future__ import annotations

import numpy as np
import torch
from helpers.folders import checkerboard_image as pattern_image
from PIL import Image

from unigendet.cascade.verifiers import Verification
from unigendet.detectors.spectral import SpectralAnalysis


def scored_image(b: float, s: float | None = None, m: float | None = None, size: int = 8, seed: int = 0):
    """A tiny image whose stage scores are ``b`` (stage 1), ``s`` (spectral), ``m`` (verifier; None: no verdict)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    image.info.update(b=b, s=s, m=m)
    return image


class CountingBinary:
    def __init__(self):
        self.calls, self.images = 0, 0

    def predict_proba(self, images, batch_size=32):
        self.calls += 1
        self.images += len(images)
        return [img.info["b"] for img in images]

    def describe(self):
        return {"detector": "counting_binary"}


class CountingSpectral:
    def __init__(self):
        self.calls = 0

    def analyze(self, image):
        self.calls += 1
        return SpectralAnalysis(map=torch.zeros(8, 8), features=torch.zeros(2), score=image.info["s"])

    def describe(self):
        return {"detector": "counting_spectral"}


class CountingVerifier:
    model = None

    def __init__(self):
        self.calls, self.images = 0, 0

    def verify(self, images, spectral_maps, questions=None):
        assert len(images) == len(spectral_maps) and all(m is not None for m in spectral_maps)
        self.calls += 1
        self.images += len(images)
        return [Verification(img.info["m"], f"m={img.info['m']}", {"source": "test"}) for img in images]

    def describe(self):
        return {"kind": "counting_verifier"}


def genimage_tree(root, generators=("ADM", "Midjourney"), per_class=3, seed=0, split="val"):
    """A GenImage-layout folder (<generator>/<split>/{ai,nature}/i.png) of pattern images."""
    rng = np.random.default_rng(seed)
    for gen in generators:
        for cls in ("ai", "nature"):
            for i in range(per_class):
                path = root / gen / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pattern_image(rng, cls == "ai").save(path)
    return root
