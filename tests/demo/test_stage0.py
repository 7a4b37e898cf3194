"""Stage 0 of the demo: the autoencoder trained on the demo's real images, cached by content."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config

pytest.importorskip("skimage")

from unigendet.demo.data import make_demo_dataset  # noqa: E402
from unigendet.demo.stage0 import META_NAME, train_stage0_vae  # noqa: E402
from unigendet.models.vae import FluxVAE  # noqa: E402
from unigendet.training.autoencoder import AutoencoderTrainConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_stage0_trains_normalises_and_reuses_its_cache(tmp_path):
    data = make_demo_dataset(tmp_path / "data", num_train=12, num_heldout=4, image_size=32, seed=0, t2i_per_photo=1)
    vae_cfg = tiny_config().vae
    train_cfg = AutoencoderTrainConfig(steps=40, batch_size=4, crop=32, lr=5e-3)
    first = train_stage0_vae(data, tmp_path / "vae", vae_cfg, train_cfg)
    assert not first.cached and first.path.is_file()
    assert first.psnr_trained > first.psnr_random + 1.0, (first.psnr_random, first.psnr_trained)
    # 6 detection reals + 13 text-to-image views; held out: 2 reals + 13 views.
    assert (first.train_images, first.heldout_images) == (6 + 13, 2 + 13)
    # The normalisation makes the training latents zero-mean, unit-variance under the run's factors.
    overrides = dict(o.split("=", 1) for o in first.model_overrides())
    assert overrides["init.vae"] == str(first.path)
    assert float(overrides["model.vae.scaling_factor"]) == first.scaling_factor > 0

    again = train_stage0_vae(data, tmp_path / "vae", vae_cfg, train_cfg)
    assert again.cached and again.psnr_trained == first.psnr_trained and again.scaling_factor == first.scaling_factor

    # Other settings (or other images) change the key: retrained, not reused.
    other = train_stage0_vae(data, tmp_path / "vae", vae_cfg, AutoencoderTrainConfig(steps=2, batch_size=4, crop=32))
    assert not other.cached
    assert json.loads((tmp_path / "vae" / META_NAME).read_text())["psnr_trained"] == other.psnr_trained


def test_the_trained_weights_load_with_the_normalisation(tmp_path):
    import dataclasses

    import torch

    data = make_demo_dataset(tmp_path / "data", num_train=6, num_heldout=2, image_size=32, seed=1, t2i_per_photo=1)
    stage = train_stage0_vae(data, tmp_path / "vae", tiny_config().vae,
                             AutoencoderTrainConfig(steps=5, batch_size=2, crop=32))
    cfg = dataclasses.replace(tiny_config().vae, scaling_factor=stage.scaling_factor, shift_factor=stage.shift_factor)
    vae = FluxVAE.from_file(stage.path, cfg)
    from unigendet.demo.stage0 import _image_tensor, stage0_images

    images = torch.stack([_image_tensor(b) for b in stage0_images(data)[0]])
    latents = vae.encode(images, sample=False)
    assert abs(float(latents.mean())) < 1e-4 and float(latents.std()) == pytest.approx(1.0, abs=1e-4)


def test_generator_pretraining_trains_flow_matching_only_and_reuses_its_cache(tmp_path):
    from unigendet.demo.run import PRETRAIN_RECIPE, stage2_overrides
    from unigendet.demo.stage0 import GENERATOR_META_NAME, pretrain_generator
    from unigendet.models.unigendet import UniGenDet

    data = make_demo_dataset(tmp_path / "data", num_train=6, num_heldout=2, image_size=64, seed=2, t2i_per_photo=2)
    vae = train_stage0_vae(data, tmp_path / "vae", _demo_vae_config(), AutoencoderTrainConfig(steps=2, batch_size=2))
    overrides = [*stage2_overrides(data, 12, 0), "logging.interval=1", "optim.warmup_steps=1", "optim.lr=3e-3"]
    first = pretrain_generator(PRETRAIN_RECIPE, overrides, tmp_path / "base", vae)
    assert not first.cached and first.steps == 12
    assert first.mse[1] < first.mse[0]  # the velocity loss fell
    model = UniGenDet.from_pretrained(first.path)  # a complete export, the autoencoder's factors included
    assert model.config.vae.scaling_factor == vae.scaling_factor
    assert dict(o.split("=", 1) for o in first.init_overrides())["init.path"] == str(first.path)

    again = pretrain_generator(PRETRAIN_RECIPE, overrides, tmp_path / "base", vae)
    assert again.cached and again.mse == first.mse
    other = pretrain_generator(PRETRAIN_RECIPE, [*overrides, "optim.lr=1e-3"], tmp_path / "base", vae)
    assert not other.cached
    assert json.loads((tmp_path / "base" / GENERATOR_META_NAME).read_text())["mse"] == list(other.mse)


def _demo_vae_config():
    from unigendet.config.loader import load_config
    from unigendet.demo.run import MODEL_RECIPE
    from unigendet.models.config import ModelConfig

    return load_config(ModelConfig, str(MODEL_RECIPE)).vae
