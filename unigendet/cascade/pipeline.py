"""The tiered cascade as an image detector: stage 1 (any registered binary detector) on every image, the spectral
stage on the images stage 1 did not pass, the verifier on the images the spectral stage did not pass.

:class:`Cascade` has the evaluation harness's detector interface (``score(images, questions)`` and ``describe()``),
so every scoring command, ``eval compare`` and the HTTP service use it like any other detector. Each stage runs
once per batch on the images that reached it, and never on an image an earlier stage has decided.

Latency (``latency_ms``, milliseconds per image): stage 1 and the verifier run batched, so each image gets the
batch's time divided by the images in it; the spectral stage runs image by image and is timed per image.

Lossy input: an image decoded from a JPEG file carries an 8x8 block grid whose spectral peaks have nothing to do
with generation, so such images get the flag ``lossy_input`` (they are still scored). A PIL image is recognised as
JPEG by ``image.format == "JPEG"``, by ``info["source_format"]`` (set by the project's image loader) or, for copies
and conversions (which drop ``format`` but keep ``info``), by the markers PIL's JPEG decoder leaves in
``image.info`` (``jfif``, ``adobe``, ``progressive``/``progression``). An image built from an array
(``Image.fromarray``) carries neither, so it is never flagged: its history is unknown.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from unigendet.cascade.config import Thresholds
from unigendet.cascade.result import (
    FLAG_LOSSY_INPUT,
    FLAG_LOW_RISK,
    STAGE_BINARY,
    STAGE_MLLM,
    STAGE_SPECTRAL,
    CascadeResult,
    Decision,
)
from unigendet.cascade.routing import binary_exits, spectral_exits, verifier_decision
from unigendet.data.images import SOURCE_FORMAT
from unigendet.labels import parse_verdict

logger = logging.getLogger(__name__)

CASCADE = "cascade"
_JPEG_INFO_KEYS = ("jfif", "adobe", "progressive", "progression")


def is_lossy(image: Image.Image) -> bool:
    """Whether ``image`` was decoded from a JPEG (see the module docstring for what can and cannot be told)."""
    return (image.format == "JPEG" or image.info.get(SOURCE_FORMAT) == "JPEG"
            or any(key in image.info for key in _JPEG_INFO_KEYS))


def image_id(image: Image.Image) -> str:
    """A content identifier: 16 hex digits of a hash of the mode, size and pixels."""
    digest = hashlib.blake2b(f"{image.mode}|{image.size}|".encode(), digest_size=8)
    digest.update(image.tobytes())
    return digest.hexdigest()


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0


class Cascade:
    """``Cascade(binary, spectral, verifier, thresholds, mllm_mapping)``.

    ``binary``: a detector with ``predict_proba(images, batch_size=...)`` (any registered baseline); ``spectral``:
    a spectral detector with ``analyze(image)`` (map + score); ``verifier``: ``verify(images, maps, questions)``
    (:mod:`unigendet.cascade.verifiers`). ``calibration``: the record of how the thresholds were chosen (saved with
    the cascade). ``spectral_map_dir``: when set, each computed map is written there as
    ``<image_id>.safetensors`` (key ``spectral_map``) and its path put in ``spectral_map_ref``.
    """

    def __init__(self, binary, spectral, verifier, thresholds: Thresholds | None = None,
                 mllm_mapping: str = "flowchart", batch_size: int = 32, calibration: dict | None = None,
                 spectral_map_dir: str | Path | None = None):
        if mllm_mapping not in ("flowchart", "code_literal"):
            raise ValueError(f"mllm_mapping must be 'flowchart' or 'code_literal', got {mllm_mapping!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.binary = binary
        self.spectral = spectral
        self.verifier = verifier
        self.thresholds = thresholds or Thresholds()
        self.thresholds.validate()
        self.mllm_mapping = mllm_mapping
        self.batch_size = batch_size
        self.calibration = calibration
        self.spectral_map_dir = None if spectral_map_dir is None else Path(spectral_map_dir)
        self.config = None  # the CascadeConfig it was built from, when built from one
        self.directory: Path | None = None  # the directory it was loaded from, when loaded

    @property
    def model(self):
        """The stage-1 network (reports read its dtype and device from it)."""
        return self.binary if isinstance(self.binary, torch.nn.Module) else None

    def with_thresholds(self, thresholds: Thresholds, calibration: dict | None = None) -> Cascade:
        """The same stages with other thresholds (and calibration record)."""
        thresholds.validate()
        return replace_attrs(self, thresholds=thresholds, calibration=calibration)

    def describe(self) -> dict[str, Any]:
        """Every setting that changes the results: each stage's description (weights fingerprints included), the
        thresholds and the mapping."""
        return {"detector": CASCADE, "binary": _describe(self.binary), "spectral": _describe(self.spectral),
                "verifier": _describe(self.verifier), "thresholds": asdict(self.thresholds),
                "mllm_mapping": self.mllm_mapping}

    # ------------------------------------------------------------------------------------------ stages
    def binary_scores(self, images: Sequence[Image.Image]) -> list[float]:
        return [float(p) for p in self.binary.predict_proba(list(images), batch_size=self.batch_size)]

    def spectral_analyses(self, images: Sequence[Image.Image]) -> list[tuple[Any, float]]:
        """(analysis, milliseconds) per image."""
        out = []
        for image in images:
            clock = _Clock()
            analysis = self.spectral.analyze(image)
            out.append((analysis, clock.ms()))
        return out

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, images: Sequence[Image.Image], questions: Sequence[str | None] | None = None,
              image_ids: Sequence[str] | None = None) -> list[CascadeResult]:
        """One :class:`CascadeResult` per image. ``questions``: what the verifier is asked (None: its default);
        ``image_ids``: identifiers for the results (default a hash of each image's pixels)."""
        images = list(images)
        n = len(images)
        if n == 0:
            return []
        ids = [image_id(img) for img in images] if image_ids is None else [str(i) for i in image_ids]
        if len(ids) != n or (questions is not None and len(questions) != n):
            raise ValueError(f"{len(ids)} image ids / {None if questions is None else len(questions)} questions "
                             f"for {n} images")
        state = [_ImageState() for _ in range(n)]

        clock = _Clock()
        binary = self.binary_scores(images)
        if len(binary) != n or not all(math.isfinite(b) for b in binary):
            raise ValueError(f"stage 1 must return one finite score per image; got {binary} for {n} images")
        per_image = clock.ms() / n
        for st, b in zip(state, binary):
            st.binary_score, st.latency[STAGE_BINARY] = b, per_image

        to_spectral = [i for i in range(n) if not binary_exits(binary[i], self.thresholds)]
        for i, (analysis, ms) in zip(to_spectral, self.spectral_analyses([images[i] for i in to_spectral])):
            if not math.isfinite(analysis.score):
                raise ValueError(f"the spectral stage returned a non-finite score for image {ids[i]}")
            st = state[i]
            st.spectral_score, st.spectral_map, st.latency[STAGE_SPECTRAL] = float(analysis.score), analysis.map, ms
            st.map_ref = self._write_map(ids[i], analysis.map)

        to_verifier = [i for i in to_spectral if not spectral_exits(state[i].spectral_score, self.thresholds)]
        if to_verifier:
            clock = _Clock()
            asked = None if questions is None else [questions[i] for i in to_verifier]
            verdicts = self.verifier.verify([images[i] for i in to_verifier],
                                            [state[i].spectral_map for i in to_verifier], asked)
            if len(verdicts) != len(to_verifier):
                raise ValueError(f"the verifier returned {len(verdicts)} results for {len(to_verifier)} images")
            per_image = clock.ms() / len(to_verifier)
            for i, verdict in zip(to_verifier, verdicts):
                state[i].verification, state[i].latency[STAGE_MLLM] = verdict, per_image
        return [self._result(ids[i], images[i], state[i]) for i in range(n)]

    def _write_map(self, identifier: str, spectral_map: torch.Tensor) -> str | None:
        if self.spectral_map_dir is None:
            return None
        self.spectral_map_dir.mkdir(parents=True, exist_ok=True)
        path = self.spectral_map_dir / f"{identifier}.safetensors"
        save_file({"spectral_map": spectral_map.detach().cpu().contiguous()}, str(path))
        return str(path)

    def _result(self, identifier: str, image: Image.Image, st: _ImageState) -> CascadeResult:
        flags = [FLAG_LOSSY_INPUT] if is_lossy(image) else []
        common = dict(image_id=identifier, binary_score=st.binary_score, spectral_score=st.spectral_score,
                      latency_ms=dict(st.latency), spectral_map=st.spectral_map, spectral_map_ref=st.map_ref)
        if st.spectral_score is None:
            return CascadeResult(p_fake=st.binary_score, decision=Decision.PASS, stage_exited=STAGE_BINARY,
                                 flags=flags, **common)
        if st.verification is None:
            return CascadeResult(p_fake=st.spectral_score, decision=Decision.PASS, stage_exited=STAGE_SPECTRAL,
                                 flags=[FLAG_LOW_RISK, *flags], **common)
        verdict = st.verification
        score = verdict.p_fake if verdict.p_fake is not None and math.isfinite(verdict.p_fake) else None
        decision, more = verifier_decision(score, self.thresholds, self.mllm_mapping)
        final = st.spectral_score if score is None else score
        text = verdict.explanation
        return CascadeResult(p_fake=final, text=text, text_label=None if text is None else parse_verdict(text),
                             decision=decision, mllm_confidence=score, stage_exited=STAGE_MLLM,
                             flags=[*more, *flags], mllm_raw=dict(verdict.raw), **common)


class _ImageState:
    """What the stages have found out about one image so far."""

    def __init__(self) -> None:
        self.binary_score: float = float("nan")
        self.spectral_score: float | None = None
        self.spectral_map: torch.Tensor | None = None
        self.map_ref: str | None = None
        self.verification = None
        self.latency: dict[str, float] = {}


def _describe(stage) -> dict[str, Any]:
    describe = getattr(stage, "describe", None)
    return describe() if callable(describe) else {"type": type(stage).__name__}


def replace_attrs(cascade: Cascade, **changes: Any) -> Cascade:
    """A shallow copy of ``cascade`` with some attributes replaced (the stages are shared, not copied)."""
    other = Cascade.__new__(Cascade)
    other.__dict__.update(cascade.__dict__)
    other.__dict__.update(changes)
    return other

