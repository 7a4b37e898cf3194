"""Tiny images, a saved tiny spectral detector and detector wrappers for the service tests (CPU, no downloads)."""

from __future__ import annotations

import io
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unigendet.detectors.base import build_detector
from unigendet.evaluation.detectors import DetectorSource, load_image_detector
from unigendet.labels import DetectionResult
from unigendet.serving.app import create_app
from unigendet.serving.config import BatchingConfig, LimitsConfig
from unigendet.serving.server import BackgroundServer

SIZE = 32


def noise_image(seed: int, grid: bool, size: int = SIZE) -> Image.Image:
    """Grey noise; ``grid``: plus bright rows every 4 px (a periodic artefact the spectral detector learns)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(128, 20, (size, size))
    if grid:
        values[::4, :] += 40
    return Image.fromarray(values.clip(0, 255).astype(np.uint8)).convert("RGB")


def image_set(n: int, seed: int = 0) -> list[Image.Image]:
    """n images alternating plain (real) and gridded (fake)."""
    return [noise_image(seed * 1000 + i, grid=bool(i % 2)) for i in range(n)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_tiny_spectral(directory: Path) -> Path:
    """A spectral detector fitted on 8 synthetic images, saved with ``save_pretrained``."""
    images = image_set(8, seed=99)
    with torch.random.fork_rng(devices=[]):
        detector = build_detector("spectral", {"radial_bins": 8, "max_side": SIZE})
        detector.fit(images, [i % 2 for i in range(len(images))], steps=20)
    detector.save_pretrained(directory)
    return directory


def load_spectral(directory: Path):
    return load_image_detector(DetectorSource(path=str(directory), detector="spectral"))


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` grey pixels, with almost no pixel data: what a
    decompression bomb looks like to a decoder that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@dataclass(frozen=True)
class StagedResult(DetectionResult):
    """A result as a tiered cascade gives it: the stage that decided, a decision and a spectral map."""

    stage_exited: str | None = None
    decision: str | None = None
    spectral_map: torch.Tensor | None = None

    def record(self) -> dict:
        return {**super().record(), "stage_exited": self.stage_exited, "decision": self.decision}


class Wrapped:
    """A detector seen through the service's eyes, with knobs: records batch sizes, can wait for ``gate``, sleep
    ``delay`` s per call, fail on images ``fail_on`` picks, or add a stage and a spectral map to each result."""

    def __init__(self, inner, delay: float = 0.0, gate: threading.Event | None = None, fail_on=None,
                 staged: bool = False):
        self.inner = inner
        self.delay = delay
        self.gate = gate
        self.fail_on = fail_on
        self.staged = staged
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()

    def describe(self) -> dict:
        return self.inner.describe()

    def score(self, images, questions=None) -> list[DetectionResult]:
        self.batch_sizes.append(len(images))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and any(self.fail_on(image) for image in images):
            raise ValueError("this detector cannot score such an image")
        results = self.inner.score(images, questions)
        if not self.staged:
            return results
        stages = ("binary", "spectral", "mllm")
        return [StagedResult(p_fake=r.p_fake, threshold=r.threshold, decision="block" if r.p_fake >= 0.5 else "pass",
                             stage_exited=stages[i % 3], text=f"decided at the {stages[i % 3]} stage",
                             spectral_map=torch.arange(12, dtype=torch.float32).reshape(3, 4))
                for i, r in enumerate(results)]


@contextmanager
def serving(detector, name: str = "spectral", batching: dict | None = None, limits: dict | None = None):
    """The service over ``detector`` on loopback (any free port); yields its base URL."""
    app = create_app(detector, name, BatchingConfig(**(batching or {})), LimitsConfig(**(limits or {})))
    with BackgroundServer(app) as server:
        yield server.url


def save_tiny_cascade(directory: Path, thresholds: dict | None = None) -> Path:
    """A tiny tiered cascade saved with ``save_cascade``: stage 1 and the spectral stage are spectral detectors
    fitted on synthetic images, stage 3 the deterministic stub verifier."""
    from unigendet.cascade import CascadeConfig, save_cascade
    from unigendet.cascade.config import Thresholds, VerifierConfig

    images = image_set(16, seed=98)
    labels = [i % 2 for i in range(len(images))]
    with torch.random.fork_rng(devices=[]):
        binary = build_detector("spectral", {"radial_bins": 4, "max_side": SIZE, "init_seed": 3})
        binary.fit(images, labels, steps=20)
        spectral = build_detector("spectral", {"radial_bins": 8, "max_side": SIZE})
        spectral.fit(images, labels, steps=20)
    binary.save_pretrained(directory / "binary")
    spectral.save_pretrained(directory / "spectral")
    config = CascadeConfig(binary=str(directory / "binary"), spectral=str(directory / "spectral"),
                           verifier=VerifierConfig(kind="stub_spectral_peak"), device="cpu",
                           thresholds=Thresholds(**(thresholds or {})))
    save_cascade(directory / "cascade", config)
    return directory / "cascade"
