"""On-disk cache of frozen-part features, one file per image, so epochs after the first cost only the head.

A feature file is addressed by the image's content hash (decoded pixels plus per-image extras such as face
landmarks) inside a directory named by the detector's feature fingerprint (backbone weights digest + every
setting that changes the features + train/eval preparation). Changing the backbone or a feature setting
therefore never reads stale features; it starts a new directory. Writes are atomic (temporary file + rename),
so concurrent ranks or an interrupted run never leave a half-written entry.

Only detectors whose features are a pure function of the image may use it (no random crops or flips):
:func:`cached_features` refuses otherwise.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from unigendet.detectors.images import content_hash

logger = logging.getLogger(__name__)


class FeatureCache:
    """Features of one detector configuration under ``root/<fingerprint>/<hh>/<hash>.safetensors``."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.directory = self.root / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._announced = False
        logger.info("frozen-feature cache in use: %s", self.directory)

    @classmethod
    def for_detector(cls, detector, root: str | Path, train: bool = False) -> FeatureCache:
        return cls(root, detector.feature_fingerprint(train))

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        if not self._announced:
            self._announced = True
            logger.info("frozen-feature cache hit (%s): features are read from disk, only the head runs",
                        self.directory)
        return load_file(str(path))["features"]

    def store(self, key: str, features: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"features": features.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def summary(self) -> str:
        total = self.hits + self.misses
        rate = 100.0 * self.hits / total if total else 0.0
        return f"feature cache {self.directory}: {self.hits} hits, {self.misses} misses ({rate:.1f}% hit rate)"

    def log_summary(self) -> None:
        logger.info(self.summary())


def _extras_of(extras: dict[str, Sequence[Any]], index: int) -> list[Any]:
    return [extras[name][index] for name in sorted(extras)]


def cached_features(detector, images: Sequence[Image.Image], cache: FeatureCache, *, train: bool = False,
                    **extras: Sequence[Any]) -> torch.Tensor:
    """Frozen-part features of ``images`` [B, ...] (CPU, float32): read from ``cache`` where present, computed
    (in one batch) and stored where not. Put the result in a batch as ``"features"`` to skip the backbone."""
    if not detector.features_are_deterministic(train):
        raise ValueError(f"{detector.name}: features are random under train={train} (random crops/flips); "
                         "they cannot be cached")
    images = list(images)
    extras = {name: list(values) for name, values in extras.items()}
    keys = [content_hash(image, *_extras_of(extras, i)) for i, image in enumerate(images)]
    found: dict[int, torch.Tensor] = {}
    for i, key in enumerate(keys):
        tensor = cache.load(key)
        if tensor is not None:
            found[i] = tensor
    missing = [i for i in range(len(images)) if i not in found]
    if missing:
        batch = detector.preprocess([images[i] for i in missing], train=train,
                                    **{name: [values[i] for i in missing] for name, values in extras.items()})
        with torch.no_grad():
            computed = detector.extract_features(detector.to_device(batch)).float().cpu()
        for row, i in enumerate(missing):
            found[i] = computed[row]
            cache.store(keys[i], computed[row])
    return torch.stack([found[i] for i in range(len(images))]) if images else torch.zeros(0)
