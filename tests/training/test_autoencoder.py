"""Training the FLUX-layout autoencoder at a tiny geometry, and ``init.vae`` handing its weights to a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_config

from unigendet.config.loader import ConfigError
from unigendet.models.vae import FluxVAE
from unigendet.training.autoencoder import AutoencoderTrainConfig, psnr, train_autoencoder
from unigendet.training.builders import InitConfig, build_model_and_vae
from unigendet.training.config import load_train_config

pytestmark = pytest.mark.usefixtures("single_thread")


def photos(n: int, seed: int, size: int = 64) -> list[torch.Tensor]:
    """Smooth colour fields with a few discs: image-like content in [-1, 1], [3, size, size]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        image = np.stack([rng.uniform(-0.6, 0.6) + rng.uniform(-0.4, 0.4) * np.sin(2 * np.pi * (
            rng.uniform(0.3, 1.5) * xx + rng.uniform(0.3, 1.5) * yy + rng.uniform(0, 1))) for _ in range(3)])
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            image[:, disc] = rng.uniform(-1, 1, (3, 1))
        out.append(torch.from_numpy(image.clip(-1, 1)).float())
    return out


def test_a_trained_autoencoder_reconstructs_unseen_images_better_than_a_random_one():
    cfg = tiny_config().vae
    torch.manual_seed(0)
    vae = FluxVAE(cfg)
    train, held_out = photos(24, seed=0), photos(6, seed=1)
    before = psnr(vae, held_out)
    history = train_autoencoder(vae, train, AutoencoderTrainConfig(steps=60, batch_size=4, crop=32, lr=5e-3))
    after = psnr(vae, held_out)
    assert history[-1]["l1"] < 0.85 * history[0]["l1"]
    assert after > before + 2.0, (before, after)  # measured: 13.2 -> 15.9 dB
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.autoencoder.training


def test_bad_inputs_are_clear_errors():
    vae = FluxVAE(tiny_config().vae)
    with pytest.raises(ValueError, match="smaller than the 64-pixel crop"):
        train_autoencoder(vae, photos(2, 0, size=32), AutoencoderTrainConfig(steps=1, crop=64))
    with pytest.raises(ValueError, match="not a multiple of the VAE downsample factor"):
        train_autoencoder(vae, photos(2, 0), AutoencoderTrainConfig(steps=1, crop=36))
    with pytest.raises(ConfigError):
        AutoencoderTrainConfig(steps=-1).validate()


@pytest.mark.parametrize("layout", ["ours", "bfl"])
def test_init_vae_replaces_the_runs_vae_in_either_layout(tmp_path, layout):
    cfg = tiny_config()
    torch.manual_seed(3)
    trained = FluxVAE(cfg.vae)
    path = tmp_path / "vae.safetensors"
    trained.save(path) if layout == "ours" else trained.save_bfl(path)
    _, vae = build_model_and_vae(InitConfig(kind="random", tokenizer="tiny", vae=str(path)), cfg)
    for (name, ours), theirs in zip(vae.autoencoder.state_dict().items(), trained.autoencoder.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_a_missing_init_vae_file_is_named_before_anything_is_built(tmp_path):
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), [f"init.vae={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(ConfigError, match="init.vae"):
        cfg.check_inputs()
