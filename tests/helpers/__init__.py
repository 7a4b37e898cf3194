"""Test helpers: the tiny model geometry, special ids and random samples (CPU, fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from unigendet.config.loader import load_config
from unigendet.data.packing import (
    CFGDropout,
    PackBuilder,
    PackGeometry,
    detection_sample,
    text_to_image_sample,
)
from unigendet.data.tokenizer import SpecialTokenIds
from unigendet.labels import LABEL_FAKE
from unigendet.models.config import ModelConfig, pack_geometry

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "model" / "tiny.yaml"

# Special ids at the top of the tiny vocabulary (512), like Qwen's after its BPE entries.
SPECIAL = SpecialTokenIds(bos=507, eos=508, start_of_image=509, end_of_image=510, pad=506)


def tiny_config(**overrides) -> ModelConfig:
    return load_config(ModelConfig, TINY_CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def geometry(cfg: ModelConfig) -> PackGeometry:
    return pack_geometry(cfg)


def builder(cfg: ModelConfig, dropout: CFGDropout | None = None, seed: int = 0) -> PackBuilder:
    return PackBuilder(SPECIAL, geometry(cfg), dropout, random.Random(seed))


def rand_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=g).tolist()


def det_sample(g: torch.Generator, vae_hw=(32, 48), vit_hw=(28, 42), label=LABEL_FAKE, smsa=True):
    return detection_sample(
        question_ids=rand_ids(g, 5),
        answer_ids=rand_ids(g, 7),
        vae_image=torch.rand(3, *vae_hw, generator=g) * 2 - 1,
        vit_image=torch.rand(3, *vit_hw, generator=g) * 2 - 1,
        label=label,
        smsa=smsa,
    )


def t2i_sample(g: torch.Generator, hw=(32, 32)):
    return text_to_image_sample(rand_ids(g, 6), torch.rand(3, *hw, generator=g) * 2 - 1)
