"""A CPU smoke run of the whole model: GDUF steps on a mixed pack of synthetic data.

Builds the tiny geometry, a pack with two SMSA detection samples and two text-to-image samples,
and runs AdamW steps on it, logging the three losses. The full GDUF demo on embedded images
replaces this once the data pipeline and trainer exist.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from unigendet.config.loader import load_config
from unigendet.data.synthetic import synthetic_pack
from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import GDUFLossConfig, GDUFObjective

logger = logging.getLogger(__name__)

# The demo runs from a source checkout (``./run.sh demo``); its recipes live in configs/.
TINY_MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def run_smoke_demo(steps: int = 30, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    cfg = load_config(ModelConfig, TINY_MODEL_CONFIG)
    model, vae = UniGenDet(cfg), FluxVAE(cfg.vae)
    batch = synthetic_pack(cfg, target_tokens=100, image_size=32, seed=seed)
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
