"""A CPU smoke run of the whole model: GDUF steps on a mixed pack of synthetic data.

Builds the tiny geometry, a pack with two SMSA detection samples and two text-to-image samples,
and runs AdamW steps on it, logging the three losses. The full GDUF demo on embedded images
replaces this once the data pipeline and trainer exist.
"""

from __future__ import annotations

import logging
import random
import time

import torch

from unigendet.config.loader import from_dict
from unigendet.data.packing import (
    LABEL_FAKE,
    LABEL_REAL,
    PackBuilder,
    PackGeometry,
    detection_sample,
    text_to_image_sample,
)
from unigendet.data.tokenizer import SpecialTokenIds
from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import GDUFLossConfig, GDUFObjective

logger = logging.getLogger(__name__)

TINY_MODEL = {
    "llm": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096},
    "vit": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "max_num_patch_per_side": 16},
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
    "max_latent_size": 16,
}


def _synthetic_pack(cfg: ModelConfig, g: torch.Generator):
    special = SpecialTokenIds(bos=507, eos=508, start_of_image=509, end_of_image=510, pad=506)
    geometry = PackGeometry(cfg.vit.patch_size, cfg.vit.max_num_patch_per_side, cfg.latent_downsample, cfg.max_latent_size)

    def ids(n):
        return torch.randint(0, 500, (n,), generator=g).tolist()

    def image(h, w):
        return torch.rand(3, h, w, generator=g) * 2 - 1

    samples = [
        detection_sample(ids(6), ids(10), image(32, 48), image(28, 42), LABEL_FAKE),
        text_to_image_sample(ids(8), image(32, 32)),
        detection_sample(ids(6), ids(10), image(48, 32), image(42, 28), LABEL_REAL),
        text_to_image_sample(ids(8), image(16, 48)),
    ]
    return PackBuilder(special, geometry, rng=random.Random(0)).build(samples)


def run_smoke_demo(steps: int = 30, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    cfg = from_dict(ModelConfig, TINY_MODEL)
    model, vae = UniGenDet(cfg), FluxVAE(cfg.vae)
    batch = _synthetic_pack(cfg, torch.Generator().manual_seed(seed))
    objective = GDUFObjective(GDUFLossConfig(det_weight=1.0), vae, cfg.latent_patch_size, cfg.detection_loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny UniGenDet: %.2fM parameters, pack of %d tokens", n_params / 1e6, batch.sequence_length)
    first = last = None
    start = time.perf_counter()
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(seed + step)
        loss, metrics = objective(model, batch, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = {k: float(v) for k, v in metrics.items()}
        first = first or values
        last = values
        if step == 1 or step % 10 == 0 or step == steps:
            logger.info("step %3d  " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()), step)
    elapsed = time.perf_counter() - start
    logger.info("%d steps in %.1fs; loss %.4f -> %.4f", steps, elapsed, first["loss"], last["loss"])
    return last
