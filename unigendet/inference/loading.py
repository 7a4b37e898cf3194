"""Load a trained model for inference: our exported directory or a BAGEL/UniGenDet-format one.

Our exported directories carry the run's ``train_config.yaml``; its image transforms and SMSA
setting are what the detector must use to see images as training did, so :func:`build_detector`
reads them. A BAGEL/UniGenDet directory has no such file: the training defaults apply.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_for_inference(
    model_dir: str | Path,
    bagel: bool = False,
    weights: str | Path | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    overrides: dict | None = None,
):
    """(model in eval mode, vae, tokenizer) on ``device`` with parameters in ``dtype``.

    ``bagel=True`` reads a BAGEL-7B-MoT / UniGenDet checkpoint directory, with ``weights`` (a
    fine-tuned file) overriding its base weights; otherwise ``model_dir`` is our export.
    ``overrides`` replace model-config fields that do not change the weights (for BAGEL directories
    e.g. the VAE geometry, which BAGEL hard-codes to FLUX's)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    target = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    if bagel:
        from unigendet.checkpoint.bagel import load_bagel_checkpoint

        model, vae, tokenizer = load_bagel_checkpoint(model_dir, weights=weights, map_location=target,
                                                      dtype=torch_dtype, **(overrides or {}))
    else:
        from unigendet.checkpoint.export import load_model_directory

        if weights:
            raise ValueError("weights= overrides only apply to BAGEL/UniGenDet directories (bagel=True)")
        model, vae, tokenizer = load_model_directory(model_dir, map_location=str(target), **(overrides or {}))
        # Parameters only: RoPE's inv_freq and the sin-cos tables stay fp32 (as the BAGEL loader does).
        for param in model.parameters():
            param.data = param.data.to(torch_dtype)
    return model.eval(), vae.to(target), tokenizer


def build_detector(
    model_dir: str | Path,
    bagel: bool = False,
    weights: str | Path | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    smsa: bool | None = None,
    overrides: dict | None = None,
    **detector_kwargs,
):
    """A :class:`~unigendet.inference.detect.Detector` over a loaded model, with the transforms and
    SMSA setting of the run that produced it (``smsa`` overrides)."""
    from unigendet.inference.detect import Detector, transforms_from_run_config

    model, vae, tokenizer = load_for_inference(model_dir, bagel, weights, device, dtype, overrides)
    run = None if bagel else transforms_from_run_config(model_dir)
    kwargs = dict(detector_kwargs)
    if run is not None:
        kwargs.setdefault("vit_transform", run[0])
        kwargs.setdefault("vae_transform", run[1])
        kwargs["smsa"] = run[2]
    elif not bagel:
        logger.warning("%s has no train_config.yaml: using the default transforms", model_dir)
    if smsa is not None:
        kwargs["smsa"] = smsa
    return Detector(model, vae, tokenizer, **kwargs)


def build_generator(model_dir: str | Path, bagel: bool = False, weights: str | Path | None = None,
                    device: str | None = None, dtype: str = "fp32", overrides: dict | None = None):
    """A :class:`~unigendet.inference.generate.Generator` over a loaded model."""
    from unigendet.inference.generate import Generator

    return Generator(*load_for_inference(model_dir, bagel, weights, device, dtype, overrides))
