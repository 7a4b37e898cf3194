"""Stage 0 of the demo: train the demo geometry's autoencoder on the demo's real training images, then pretrain the
generator on the captioned views.

BAGEL's FLUX autoencoder has released weights; the demo's small autoencoder has none, and a random one turns every
latent into coloured noise. So the demo first trains it (``unigendet.training.autoencoder``) on the real training
images (detection reals and the text-to-image views), measures its reconstruction PSNR on held-out reals, and sets
the latent normalisation from the training latents (shift = their mean, scale = 1 / their standard deviation), so
that flow matching sees unit-variance latents as it does with FLUX's published factors. GDUF, DIGA and generation
then all use this autoencoder.

The result is cached by content: a directory holding ``ae.safetensors`` and ``vae.json`` (the cache key, the
normalisation and the measured figures). The key hashes the training images' bytes, the geometry and the training
settings, so a second run with the same data reuses the weights and any change retrains them.

The paper starts from BAGEL, a model that can already draw what a caption names; GDUF and DIGA refine it. The demo's
model starts from random weights, and GDUF's share of text-to-image samples alone leaves it drawing colour and
texture but not the photographs' layout. So stage 0 can also pretrain the whole model on text-to-image flow matching
(:func:`pretrain_generator`, the ``train/t2i_pretrain_demo.yaml`` recipe; off by default, because GDUF's detection
loss then stopped learning), cached the same way: by the resolved training config, the autoencoder's weights and the
captioned views' bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unigendet.data.paths import expand_data_files
from unigendet.models.config import VAEConfig
from unigendet.models.vae import FluxVAE
from unigendet.training.autoencoder import AutoencoderTrainConfig, psnr, train_autoencoder
from unigendet.utils.fingerprint import hash_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ae.safetensors"
META_NAME = "vae.json"
GENERATOR_META_NAME = "generator.json"
# Bump when the training procedure changes in a way the key cannot see, so old caches are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class VAEStage:
    """A trained demo autoencoder: its weight file, latent normalisation and measured figures."""

    path: Path
    scaling_factor: float
    shift_factor: float
    psnr_random: float  # held-out reconstruction PSNR (dB) of the untrained autoencoder
    psnr_trained: float
    train_images: int
    heldout_images: int
    seconds: float  # training time when it was trained (a cached result keeps the original figure)
    cached: bool  # True when this run reused a cached result

    def model_overrides(self) -> list[str]:
        """Recipe overrides that make a run use this autoencoder and its latent normalisation."""
        return [f"init.vae={self.path}", f"model.vae.scaling_factor={self.scaling_factor!r}",
                f"model.vae.shift_factor={self.shift_factor!r}"]


def _image_tensor(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _real_image_bytes(json_path: Path, image_root: Path) -> list[bytes]:
    entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
    return [(Path(image_root) / e["image"]).read_bytes() for e in entries if e["label"] == 1]


def _parquet_image_bytes(path: Path) -> list[bytes]:
    import pyarrow.parquet as pq

    return list(pq.read_table(path, columns=["image"]).column("image").to_pylist())


def stage0_images(data) -> tuple[list[bytes], list[bytes]]:
    """(training, held-out) encoded real images of a demo dataset: the detection reals of the training set plus the
    training text-to-image views; the held-out set's reals plus the held-out views."""
    train = _real_image_bytes(data.train_json, data.image_root) + _parquet_image_bytes(data.t2i_parquet)
    heldout = _real_image_bytes(data.heldout_json, data.image_root)
    if data.t2i_heldout_parquet is not None:
        heldout += _parquet_image_bytes(data.t2i_heldout_parquet)
    return train, heldout


def cache_key(train_images: list[bytes], vae_cfg: VAEConfig, train_cfg: AutoencoderTrainConfig) -> str:
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "vae": asdict(_unnormalised(vae_cfg)), "train": asdict(train_cfg)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for data in train_images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def _unnormalised(vae_cfg: VAEConfig) -> VAEConfig:
    """The geometry with identity latent normalisation (the factors are an output of stage 0, not an input)."""
    return replace(vae_cfg, scaling_factor=1.0, shift_factor=0.0)


@torch.no_grad()
def latent_normalisation(vae: FluxVAE, images: list[torch.Tensor], batch_size: int = 32) -> tuple[float, float]:
    """(scaling_factor, shift_factor) that give the posterior means of ``images`` zero mean and unit variance."""
    latents = torch.cat([vae.encode(torch.stack(images[i:i + batch_size]), sample=False)
                         for i in range(0, len(images), batch_size)])
    latents = latents / vae.scale + vae.shift  # back to the raw latent, whatever the VAE's current factors
    return 1.0 / float(latents.std()), float(latents.mean())


def _load_cached(directory: Path, key: str) -> VAEStage | None:
    meta_path, weights = directory / META_NAME, directory / WEIGHTS_NAME
    if not (meta_path.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("key") != key:
        logger.info("stage 0: cached autoencoder in %s is for other data or settings; retraining", directory)
        return None
    figures = {k: meta[k] for k in ("scaling_factor", "shift_factor", "psnr_random", "psnr_trained", "train_images",
                                    "heldout_images", "seconds")}
    return VAEStage(path=weights, cached=True, **figures)


def train_stage0_vae(data, out_dir: str | Path, vae_cfg: VAEConfig, train_cfg: AutoencoderTrainConfig) -> VAEStage:
    """Train (or reuse from ``out_dir``) the demo autoencoder on ``data``'s real training images."""
    directory = Path(out_dir)
    train_bytes, heldout_bytes = stage0_images(data)
    key = cache_key(train_bytes, vae_cfg, train_cfg)
    cached = _load_cached(directory, key)
    if cached is not None:
        logger.info("stage 0: reusing the autoencoder in %s (%.2f dB held-out PSNR)", directory, cached.psnr_trained)
        return cached
    train_images = [_image_tensor(b) for b in train_bytes]
    heldout_images = [_image_tensor(b) for b in heldout_bytes]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        vae = FluxVAE(_unnormalised(vae_cfg))
    before = psnr(vae, heldout_images)
    start = time.perf_counter()
    train_autoencoder(vae, train_images, train_cfg)
    seconds = time.perf_counter() - start
    after = psnr(vae, heldout_images)
    scale, shift = latent_normalisation(vae, train_images)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    vae.save(weights)
    stage = VAEStage(path=weights, scaling_factor=scale, shift_factor=shift, psnr_random=before, psnr_trained=after,
                     train_images=len(train_images), heldout_images=len(heldout_images), seconds=seconds,
                     cached=False)
    meta = {"key": key, **{k: v for k, v in asdict(stage).items() if k not in ("path", "cached")}}
    (directory / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    logger.info("stage 0: autoencoder trained in %.1f s, held-out PSNR %.2f -> %.2f dB", seconds, before, after)
    return stage


@dataclass(frozen=True)
class GeneratorStage:
    """A pretrained demo generator: its export directory and figures."""

    path: Path  # a UniGenDet export (``from_pretrained`` / ``init.kind=unigendet``)
    steps: int
    mse: tuple[float, float]  # velocity MSE at the first and last logged step
    seconds: float  # training time when it was trained (a cached result keeps the original figure)
    cached: bool

    def init_overrides(self) -> list[str]:
        """Recipe overrides that make a run start from this generator (its tokenizer included)."""
        return ["init.kind=unigendet", f"init.path={self.path}", "init.tokenizer=null"]


def generator_cache_key(cfg, vae: VAEStage, t2i_files: list[str]) -> str:
    """Hash of the resolved training config (its checkpoint directory aside), the autoencoder's weights and the
    text-to-image data files."""
    settings = asdict(cfg)
    settings.pop("checkpoint", None)
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "config": settings}, sort_keys=True,
                                       default=str).encode())
    digest.update(hash_file(Path(vae.path)).encode())
    for name in t2i_files:
        digest.update(hash_file(Path(name)).encode())
    return digest.hexdigest()


def pretrain_generator(recipe: str | Path, overrides: list[str], out_dir: str | Path, vae: VAEStage
                       ) -> GeneratorStage:
    """Train (or reuse from ``out_dir``) the text-to-image recipe with ``vae``; its export is ``out_dir/final``."""
    from unigendet.training.config import load_train_config
    from unigendet.training.trainer import Trainer

    directory = Path(out_dir)
    cfg = load_train_config(str(recipe), [*overrides, *vae.model_overrides(), f"checkpoint.dir={directory}",
                                          "checkpoint.resume=none"])
    t2i_files = [str(f) for source in cfg.data.sources.values() if source.kind == "t2i"
                 for f in expand_data_files(source.data_files)]
    key = generator_cache_key(cfg, vae, t2i_files)
    meta_path, export = directory / GENERATOR_META_NAME, directory / "final"
    if meta_path.is_file() and export.is_dir():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            logger.info("stage 0: reusing the pretrained generator in %s", export)
            return GeneratorStage(path=export, steps=meta["steps"], mse=tuple(meta["mse"]), seconds=meta["seconds"],
                                  cached=True)
        logger.info("stage 0: cached generator in %s is for other data or settings; retraining", directory)
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    state = Trainer(cfg).train()
    seconds = time.perf_counter() - start
    logged = [h["mse"] for h in state.history if "mse" in h]
    stage = GeneratorStage(path=export, steps=cfg.total_steps, mse=(logged[0], logged[-1]), seconds=seconds,
                           cached=False)
    meta = {"key": key, "steps": stage.steps, "mse": list(stage.mse), "seconds": seconds}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    logger.info("stage 0: generator pretrained in %.1f s, velocity MSE %.3f -> %.3f", seconds, *stage.mse)
    return stage
