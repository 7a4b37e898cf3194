"""Random packs in the real layouts, for smoke runs and benchmarks (no tokenizer, no images on disk)."""

from __future__ import annotations

import random

import torch

from unigendet.data.packing import (
    PackBuilder,
    PackedBatch,
    PlanItem,
    detection_sample,
    text_to_image_sample,
)
from unigendet.data.tokenizer import SpecialTokenIds
from unigendet.labels import LABEL_FAKE, LABEL_REAL
from unigendet.models.config import ModelConfig, pack_geometry


def reserved_special_ids(vocab_size: int) -> SpecialTokenIds:
    """Special ids at the top of a vocabulary, for random-token packs without a tokenizer."""
    top = vocab_size - 1
    return SpecialTokenIds(bos=top - 4, eos=top - 3, start_of_image=top - 2, end_of_image=top - 1, pad=top)


def synthetic_samples(
    cfg: ModelConfig,
    target_tokens: int,
    image_size: int,
    g: torch.Generator,
    question_len: int = 16,
    answer_len: int = 48,
    caption_len: int = 32,
) -> list[list[PlanItem]]:
    """Alternate SMSA detection and text-to-image samples until ``target_tokens`` is reached.

    ``image_size`` is the VAE side in pixels (a multiple of the latent stride); the ViT image is the
    largest multiple of the patch size not above it."""
    stride, patch = cfg.latent_downsample, cfg.vit.patch_size
    if image_size % stride:
        raise ValueError(f"image_size {image_size} must be a multiple of the latent stride {stride}")
    vit_side = image_size // patch * patch
    vocab = cfg.llm.vocab_size - 5

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    def image(side):
        return torch.rand(3, side, side, generator=g) * 2 - 1

    lat = (image_size // stride) ** 2
    vit = (vit_side // patch) ** 2
    samples, tokens, k = [], 0, 0
    while tokens < target_tokens:
        if k % 2 == 0:
            label = LABEL_FAKE if (k // 2) % 2 == 0 else LABEL_REAL
            samples.append(detection_sample(ids(question_len), ids(answer_len), image(image_size), image(vit_side), label))
            tokens += lat + vit + question_len + answer_len + 8
        else:
            samples.append(text_to_image_sample(ids(caption_len), image(image_size)))
            tokens += lat + caption_len + 4
        k += 1
    return samples


def synthetic_pack(cfg: ModelConfig, target_tokens: int, image_size: int, seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    samples = synthetic_samples(cfg, target_tokens, image_size, g)
    builder = PackBuilder(reserved_special_ids(cfg.llm.vocab_size), pack_geometry(cfg), rng=random.Random(seed))
    return builder.build(samples)
