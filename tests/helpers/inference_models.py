"""Shared by the inference tests: small image transforms and a model directory written the way training exports."""

from __future__ import annotations

from pathlib import Path

import yaml

from unigendet.data.transforms import ImageTransform

# Small enough that detection contexts of test images stay a few hundred tokens.
SMALL_VIT = ImageTransform(56, 28, 14, 10**6)
SMALL_VAE = ImageTransform(64, 32, 16, 10**6)


def _transform_dict(tr: ImageTransform) -> dict:
    return {"max_size": tr.max_size, "min_size": tr.min_size, "stride": tr.stride, "max_pixels": tr.max_pixels}


def write_model_directory(directory: Path, model, vae, tokenizer) -> Path:
    """An export of ``model`` plus the ``train_config.yaml`` the detector reads its transforms from."""
    from unigendet.checkpoint.export import save_model_directory

    save_model_directory(directory, model, model.state_dict(), vae, tokenizer)
    (directory / "train_config.yaml").write_text(yaml.safe_dump(
        {"data": {"vit_transform": _transform_dict(SMALL_VIT), "vae_transform": _transform_dict(SMALL_VAE),
                  "smsa": True}}))
    return directory
