"""Detection with explanation: image(s) -> real/fake (detection head) + generated explanation.

Context per image = the SMSA layout UniGenDet trains on, built by the training encoder
(:class:`~unigendet.data.encoding.SampleEncoder`) so inference sees exactly what training saw:

    clean VAE block (RoPE 0) -> ViT block (RoPE 1) -> question ``<|im_start|> q <|im_end|>``

Decoding then starts with the answer's ``<|im_start|>``; at that step (step 0) the detection head
reads the final-normed hidden state, the position it was trained on, and the LM head
predicts the first answer token. Every image of a batch is decoded together and stops on its own
``<|im_end|>`` (or ``max_new_tokens``); finished sequences leave the batch.

Randomness is per image and independent of batching: image ``i`` gets its own seed, by default
derived from ``seed`` and the image's pixels (:func:`image_seed`; explicit per-image seeds may be
passed instead), used for its VAE posterior sample (CPU generator, as the reference) and for token
sampling (a generator on the model's device). So ``detect([a, b])[1] == detect([b])[0]``, and
different images still draw different noise.

Decoding: greedy by default (the official FakeClue evaluation); sampling with temperature, top-k,
top-p and a repetition penalty through transformers' logits processors. The paper reports nucleus
sampling with top-p 0.8 and top-k 20 but not the temperature or the penalty; ``DecodingConfig.paper()``
fills those with Qwen2.5's own generation defaults (temperature 0.7, repetition penalty 1.05), whose
top-p/top-k are the paper's values [inferred].

Differences from the reference evaluation, all options here: the reference first resizes the input
with the VAE rule and feeds that image to both transforms (``pre_resize_vae=True``), while training
transforms the original image (our default); the reference appends an output-format block to the
question (pass it in ``question`` if wanted).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from unigendet.config.loader import ConfigError, from_dict, load_yaml
from unigendet.data.encoding import IMAGE_TAG, SampleEncoder
from unigendet.data.images import to_rgb
from unigendet.data.packing import PlanItem, TextItem, VAEImage, ViTImage
from unigendet.data.tokenizer import special_token_ids
from unigendet.data.transforms import (
    ImageTransform,
    patchify_latent,
    vae_transform,
    vit_transform,
)
from unigendet.inference.cached_forward import CachedForward
from unigendet.labels import LABEL_REAL, DetectionResult, parse_verdict
from unigendet.models.bridges import fake_probability
from unigendet.models.config import pack_geometry

logger = logging.getLogger(__name__)

# The demo's FakeClue question (text after ``<image>``, leading newline kept as in training).
DEFAULT_QUESTION = "\nIs this image real or fake? Explain your reasoning."
# Explanation length limit and base seed of a detection run, unless the caller says otherwise.
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_SEED = 42
DEFAULT_BATCH_SIZE = 8  # images decoded together (results do not depend on it)


# --------------------------------------------------------------------------------------------------
# Decoding settings


@dataclass
class DecodingConfig:
    """How answer tokens are chosen. Greedy unless ``do_sample``; the repetition penalty applies in
    both modes (as in transformers), temperature / top-k / top-p only when sampling.
    ``top_k=0`` and ``top_p=1.0`` switch those filters off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def greedy(cls) -> DecodingConfig:
        return cls()

    @classmethod
    def paper(cls, temperature: float = 0.7, repetition_penalty: float = 1.05) -> DecodingConfig:
        """Nucleus sampling as the paper reports it (top-p 0.8, top-k 20); temperature and penalty are
        not given there: Qwen2.5's generation defaults are used [inferred]."""
        return cls(do_sample=True, temperature=temperature, top_k=20, top_p=0.8, repetition_penalty=repetition_penalty)


class TokenChooser:
    """Applies a :class:`DecodingConfig` to a batch of logits rows, each with its own generator and
    token history (the answer tokens generated so far, which the repetition penalty reads)."""

    def __init__(self, config: DecodingConfig, seeds: Sequence[int], device: torch.device | str):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.config = config
        self.penalty = (RepetitionPenaltyLogitsProcessor(config.repetition_penalty)
                        if config.repetition_penalty != 1.0 else None)
        warpers = []
        if config.do_sample:
            if config.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k > 0:
                warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(config.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = None
        if config.do_sample:
            self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def process(self, logits: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Processed scores ``[B, V]`` (fp32): penalty, then (sampling) temperature, top-k, top-p."""
        scores = logits.float()
        vocab = scores.shape[-1]
        if self.penalty is not None and any(histories):
            width = max(len(h) for h in histories)
            # Rows are padded with an id >= vocab, which the processor clamps onto a dropped column.
            ids = torch.full((len(histories), width), vocab, dtype=torch.long)
            for r, h in enumerate(histories):
                ids[r, : len(h)] = torch.tensor(list(h), dtype=torch.long)
            scores = self.penalty(ids.to(scores.device), scores)
        if len(self.warpers):
            dummy = torch.zeros((scores.shape[0], 1), dtype=torch.long, device=scores.device)
            scores = self.warpers(dummy, scores)
        return scores

    def __call__(self, logits: torch.Tensor, histories: Sequence[Sequence[int]], rows: Sequence[int]) -> torch.Tensor:
        """Next token per row ``[B]``; ``rows[k]`` names the sequence (and so the generator) of row k."""
        scores = self.process(logits, histories)
        if not self.config.do_sample:
            return scores.argmax(-1)
        probs = scores.softmax(-1)
        picks = [torch.multinomial(probs[k], 1, generator=self.generators[r]) for k, r in enumerate(rows)]
        return torch.cat(picks)


# --------------------------------------------------------------------------------------------------
# Transforms


def default_transforms(config) -> tuple[ImageTransform, ImageTransform]:
    """(ViT, VAE) transforms: the training defaults (ViT 224-980 px / 14, VAE 512-1024 px / 16), with
    sizes capped to what the model's position tables hold (small debug geometries)."""
    vit_stock, vae_stock = vit_transform(), vae_transform()
    patch, vit_side = config.vit.patch_size, config.vit.patch_size * config.vit.max_num_patch_per_side
    vit_max = min(vit_stock.max_size, vit_side)
    vit = ImageTransform(vit_max, min(vit_stock.min_size, vit_max), patch, vit_stock.max_pixels)
    stride, vae_side = config.latent_downsample, config.latent_downsample * config.max_latent_size
    vae_max = min(vae_stock.max_size, vae_side)
    vae = ImageTransform(vae_max, min(vae_stock.min_size, vae_max), stride, vae_stock.max_pixels)
    return vit, vae


Posterior = Literal["sample", "mean"]

# The resolved training config a run exports next to its model.
RUN_CONFIG_NAME = "train_config.yaml"
# What the detector takes from the run config's ``data`` section: how training turned images into samples.
RUN_PREPROCESSING_KEYS = ("vit_transform", "vae_transform", "smsa")


@dataclass
class DetectorPreprocessing:
    """How the detector turns an image into the model's context.

    ``vit_transform`` / ``vae_transform``: None means :func:`default_transforms` for the model;
    ``smsa``: the clean VAE block precedes the ViT block (the layout trained with ``data.smsa``);
    ``posterior``: the VAE latent of the context is a posterior sample or its mean;
    ``pre_resize_vae``: resize the image with the VAE rule before both transforms (the reference evaluation).
    """

    vit_transform: ImageTransform | None = None
    vae_transform: ImageTransform | None = None
    smsa: bool = True
    posterior: Posterior = "sample"
    pre_resize_vae: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', got {self.posterior!r}")

    @classmethod
    def from_run(cls, directory: str | Path) -> DetectorPreprocessing | None:
        """The transforms and SMSA setting of the training run that exported ``directory`` (the ``data``
        section of its ``train_config.yaml``, read with the typed config loader); None when there is no
        such file. The other fields keep their defaults."""
        path = Path(directory) / RUN_CONFIG_NAME
        if not path.is_file():
            return None
        data = load_yaml(path).get("data") or {}
        try:
            return from_dict(cls, {key: data[key] for key in RUN_PREPROCESSING_KEYS if key in data})
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"{path}: data.{err}") from err


# --------------------------------------------------------------------------------------------------
# Detector


def image_seed(seed: int, image: Image.Image) -> int:
    """A per-image seed from ``seed`` and the image content (size, mode, pixels): deterministic,
    independent of the image's position in a batch, different for different images."""
    digest = hashlib.sha256(f"{int(seed)}|{image.mode}|{image.size}|".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest()[:8], "big") & (2**63 - 1)


class UniGenDetDetector:
    """``UniGenDetDetector(model, vae, tokenizer).detect(images)`` -> one
    :class:`~unigendet.labels.DetectionResult` per image (head p(fake) and generated explanation).

    ``threshold``: the head says "fake" when p(fake) >= threshold."""

    def __init__(
        self,
        model,
        vae,
        tokenizer,
        preprocessing: DetectorPreprocessing | None = None,
        threshold: float = 0.5,
        max_tokens_per_sample: int = 65536,
    ):
        preprocessing = preprocessing or DetectorPreprocessing()
        self.model = model.eval()
        self.vae = vae
        self.tokenizer = tokenizer
        self.special = special_token_ids(tokenizer)
        default_vit, default_vae = default_transforms(model.config)
        self.preprocessing = replace(preprocessing, vit_transform=preprocessing.vit_transform or default_vit,
                                     vae_transform=preprocessing.vae_transform or default_vae)
        self.encoder = SampleEncoder(
            tokenizer,
            pack_geometry(model.config),
            self.preprocessing.vit_transform,
            self.preprocessing.vae_transform,
            smsa=self.preprocessing.smsa,
            max_tokens_per_sample=max_tokens_per_sample,
        )
        self.threshold = threshold
        self.cached_forward = CachedForward(model, self.special)

    def settings(self) -> dict[str, Any]:
        """The settings that change what the detector outputs for a given model (for job fingerprints)."""
        prep = self.preprocessing
        return {"posterior": prep.posterior, "pre_resize_vae": prep.pre_resize_vae, "threshold": self.threshold,
                "smsa": prep.smsa, "vit_transform": asdict(prep.vit_transform),
                "vae_transform": asdict(prep.vae_transform)}

    # ------------------------------------------------------------------ context
    def context(self, image: Image.Image, question: str, extra_images: Sequence[Image.Image] = (),
                answer_start: bool = False) -> list[PlanItem]:
        """The SMSA plan of one image (VAE block, ViT block, question), as the training encoder lays it out.

        ``extra_images`` are shown to the understanding side as further ViT blocks right after the image's own,
        before the question (for example a spectral map; the model was not trained with such inputs).
        ``answer_start`` keeps the (empty) answer, whose ``<|im_start|>`` is where the detection head reads: the
        head is then read in the same forward as the context."""
        image = to_rgb(image) if image.mode != "RGB" else image
        if self.preprocessing.pre_resize_vae:
            image = self.encoder.vae_transform.resize(image)
        sample = self.encoder.detection(image, question, answer="", label=LABEL_REAL)
        assert isinstance(sample.items[-1], TextItem) and sample.items[-1].detection_label is not None
        # Without answer_start the (empty) answer is dropped: decoding produces it.
        items = sample.items if answer_start else sample.items[:-1]
        if extra_images:
            at = next(i for i, item in enumerate(items) if isinstance(item, ViTImage)) + 1
            extra = [ViTImage(self.encoder.vit_image(to_rgb(img))) for img in extra_images]
            items = [*items[:at], *extra, *items[at:]]
        return items

    def _latents(self, plans: list[list[PlanItem]], seeds: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        vae_device = next(self.vae.parameters()).device
        images, generators = [], []
        for plan, seed in zip(plans, seeds):
            for item in plan:
                if isinstance(item, VAEImage):
                    images.append(item.image.to(vae_device))
                    # One generator per image, seeded alone: an image's latent does not depend on its batch.
                    generators.append(torch.Generator().manual_seed(int(seed)))
        if not images:
            return None, None
        # Same-size images encode as one batch (measured 25% faster than one by one for eight 128-px images).
        latents = self.vae.encode_list(images, generator=generators, sample=self.preprocessing.posterior == "sample")
        tokens = [patchify_latent(z, self.model.config.latent_patch_size).float() for z in latents]
        lat = torch.cat(tokens).to(self.cached_forward.device)
        return lat, torch.zeros(lat.shape[0], device=self.cached_forward.device)

    @torch.no_grad()
    def _head_only(self, plans: list[list[PlanItem]], seeds: list[int]) -> list[float]:
        """p(fake) of plans that end with the answer's ``<|im_start|>``: one forward, no decoding step (the
        context's keys and values go to a scratch cache that is dropped)."""
        fwd = self.cached_forward
        batch = fwd.pack(plans)
        lat, ts = self._latents(plans, seeds)
        hidden = fwd.forward(fwd.new_cache(len(plans)), fwd.embed(batch, lat, ts), commit=False)
        logits = fwd.detection_logits(hidden[batch.det_indexes.to(hidden.device)])
        return [float(p) for p in fake_probability(logits, self.model.config.detection_loss).cpu()]

    # ------------------------------------------------------------------ detect
    @torch.no_grad()
    def detect(
        self,
        images: Sequence[Image.Image],
        question: str | None = None,
        questions: Sequence[str] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        decoding: DecodingConfig | None = None,
        seed: int | Sequence[int] = DEFAULT_SEED,
        extra_images: Sequence[Sequence[Image.Image]] | None = None,
    ) -> list[DetectionResult]:
        """Detect and explain a batch of images. ``question`` (one for all) or ``questions`` (one per
        image) is the text after ``<image>`` in the FakeClue human turn; default :data:`DEFAULT_QUESTION`.
        ``seed``: an int (combined with each image's content, :func:`image_seed`) or one seed per image.
        ``extra_images``: per image, further images for the understanding side (see :meth:`context`)."""
        images = list(images)
        if not images:
            return []
        if questions is not None and question is not None:
            raise ValueError("pass question or questions, not both")
        if questions is None:
            questions = [DEFAULT_QUESTION if question is None else question] * len(images)
        questions = [q.split(IMAGE_TAG, 1)[1] if IMAGE_TAG in q else q for q in questions]
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        images = [to_rgb(img) if img.mode != "RGB" else img for img in images]
        seeds = [image_seed(seed, img) for img in images] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        decoding = decoding or DecodingConfig()

        if extra_images is not None and len(extra_images) != len(images):
            raise ValueError(f"{len(extra_images)} lists of extra images for {len(images)} images")
        extras = [()] * len(images) if extra_images is None else [list(e) for e in extra_images]
        head = getattr(self.model.config, "detection_head", False)
        if max_new_tokens == 0 and head:
            plans = [self.context(img, q, extra, answer_start=True) for img, q, extra in zip(images, questions, extras)]
            return [DetectionResult(p, "", parse_verdict(""), [], False, self.threshold)
                    for p in self._head_only(plans, seeds)]
        fwd = self.cached_forward
        plans = [self.context(img, q, extra) for img, q, extra in zip(images, questions, extras)]
        batch = fwd.pack(plans)
        lat, ts = self._latents(plans, seeds)
        cache = fwd.new_cache(len(plans))
        fwd.forward(cache, fwd.embed(batch, lat, ts), commit=True)

        chooser = TokenChooser(decoding, seeds, fwd.device)
        n = len(images)
        generated: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        p_fake = [math.nan] * n
        active = list(range(n))
        inputs = torch.full((n,), self.special.bos, dtype=torch.long, device=fwd.device)
        step = 0
        while active:
            hidden = fwd.forward(cache, fwd.token_block(inputs), commit=True)
            if step == 0 and head:
                probs = fake_probability(fwd.detection_logits(hidden), self.model.config.detection_loss)
                p_fake = [float(p) for p in probs.cpu()]
            if step >= max_new_tokens:
                break
            next_ids = chooser(fwd.lm_logits(hidden), [generated[r] for r in active], active)
            keep = []
            for row, (r, tok) in enumerate(zip(active, next_ids.tolist())):
                if tok == self.special.eos:
                    stopped[r] = True
                    continue
                generated[r].append(tok)
                if len(generated[r]) < max_new_tokens:
                    keep.append(row)
            if len(keep) < len(active) and keep:
                cache = cache.select(keep)
            active = [active[row] for row in keep]
            inputs = next_ids[keep]
            step += 1

        results = []
        for i in range(n):
            text = self.tokenizer.decode(generated[i], skip_special_tokens=False)
            results.append(DetectionResult(p_fake[i], text, parse_verdict(text), generated[i], stopped[i],
                                           self.threshold))
        return results
