"""Load a trained model for inference: our exported directory or a BAGEL/UniGenDet-format one.

Our exported directories carry the run's ``train_config.yaml``; its image transforms and SMSA
setting are what the detector must use to see images as training did, so :func:`build_detector`
reads them. A BAGEL/UniGenDet directory has no such file: the training defaults apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from unigendet.config.loader import ConfigError
from unigendet.inference.detect import RUN_CONFIG_NAME, DetectorPreprocessing, Posterior, UniGenDetDetector
from unigendet.inference.generate import Generator

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


def detector_preprocessing(
    model_dir: str | Path,
    bagel: bool = False,
    smsa: bool | None = None,
    posterior: Posterior | None = None,
    pre_resize_vae: bool | None = None,
) -> DetectorPreprocessing:
    """The preprocessing of the run that exported ``model_dir`` (its ``train_config.yaml``: transforms and
    SMSA; the defaults for a BAGEL directory or a directory without one), with the given choices (None: keep)."""
    run = None if bagel else DetectorPreprocessing.from_run(model_dir)
    if run is None:
        if not bagel:
            logger.warning("%s has no %s: using the default transforms", model_dir, RUN_CONFIG_NAME)
        run = DetectorPreprocessing()
    choices = {"smsa": smsa, "posterior": posterior, "pre_resize_vae": pre_resize_vae}
    return replace(run, **{name: value for name, value in choices.items() if value is not None})


def build_detector(
    model_dir: str | Path,
    bagel: bool = False,
    weights: str | Path | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    overrides: dict | None = None,
    *,
    smsa: bool | None = None,
    posterior: Posterior | None = None,
    pre_resize_vae: bool | None = None,
) -> UniGenDetDetector:
    """A :class:`~unigendet.inference.detect.UniGenDetDetector` over a loaded model, seeing images as the
    run that produced it did (:func:`detector_preprocessing`; ``smsa``, ``posterior`` and
    ``pre_resize_vae`` override when given)."""
    model, vae, tokenizer = load_for_inference(model_dir, bagel, weights, device, dtype, overrides)
    preprocessing = detector_preprocessing(model_dir, bagel, smsa, posterior, pre_resize_vae)
    return UniGenDetDetector(model, vae, tokenizer, preprocessing)


def build_generator(model_dir: str | Path, bagel: bool = False, weights: str | Path | None = None,
                    device: str | None = None, dtype: str = "fp32", overrides: dict | None = None) -> Generator:
    """A :class:`~unigendet.inference.generate.Generator` over a loaded model."""
    return Generator(*load_for_inference(model_dir, bagel, weights, device, dtype, overrides))


def require_paths(paths: dict[str, str | None]) -> None:
    """ConfigError naming the key of the first given path that does not exist (None: not given, not checked)."""
    for key, path in paths.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist")


@dataclass
class ModelSource:
    """Which trained model to load, and where."""

    path: str  # our exported model directory, or a BAGEL-7B-MoT / UniGenDet directory with bagel: true
    bagel: bool = False
    weights: str | None = None  # with bagel: a fine-tuned weights file overriding the directory's
    device: str | None = None  # default: cuda if available, else cpu
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def validate(self) -> None:
        if self.weights is not None and not self.bagel:
            raise ConfigError("weights overrides only apply to BAGEL/UniGenDet directories (bagel: true)")

    def check_inputs(self, key: str = "model") -> None:
        require_paths({f"{key}.path": self.path, f"{key}.weights": self.weights})

    def load_kwargs(self) -> dict[str, Any]:
        return {"model_dir": self.path, "bagel": self.bagel, "weights": self.weights, "device": self.device,
                "dtype": self.dtype}

    def load_detector(self, options: "DetectorOptions | None" = None) -> UniGenDetDetector:
        options = options or DetectorOptions()
        return build_detector(**self.load_kwargs(), smsa=options.smsa, posterior=options.posterior,
                              pre_resize_vae=options.pre_resize_vae)

    def load_generator(self) -> Generator:
        return build_generator(**self.load_kwargs())


@dataclass
class DetectorOptions:
    """Choices that replace the preprocessing the model's run used
    (:class:`~unigendet.inference.detect.DetectorPreprocessing`); None keeps the run's (or its default)."""

    smsa: bool | None = None  # the clean VAE block before the ViT block
    posterior: Posterior | None = None  # VAE latent of the context: "sample" or "mean"
    pre_resize_vae: bool | None = None  # the reference evaluation's VAE resize before both transforms
