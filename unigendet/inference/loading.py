"""Load a trained model for inference: our exported directory or a BAGEL/UniGenDet-format one.

Our exported directories carry the run's ``train_config.yaml``; its image transforms and SMSA
setting are what the detector must use to see images as training did, so :func:`build_detector`
reads them. A BAGEL/UniGenDet directory has no such file: the training defaults apply.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from unigendet.config.loader import ConfigError
from unigendet.inference.detect import RUN_CONFIG_NAME, DetectorPreprocessing, Posterior, UniGenDetDetector
from unigendet.inference.device_map import check_device_map, dispatch, input_device
from unigendet.inference.generate import Generator
from unigendet.utils.hub import looks_like_hub_id, resolve_model_dir

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The parameter dtype of ``dtype`` on ``device``: ``auto`` is bf16 on CUDA (what BAGEL runs in, half the
    memory of fp32) and fp32 elsewhere (CPU bf16 matmuls are slow and lose precision for nothing)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | None, env: Mapping[str, str] | None = None) -> torch.device:
    """The device a command runs on: ``device``, or cuda when available else cpu.

    Under a multi-process launch (torchrun, the DeepSpeed launcher, SLURM via torchrun) every rank sees all GPUs
    of its node, so an index-less ``cuda`` means this rank's own GPU, ``cuda:$LOCAL_RANK``; without that, every
    rank of an 8-GPU evaluation would load its model onto GPU 0. An explicit index (``cuda:3``) is kept.
    """
    env = os.environ if env is None else env
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = env.get("LOCAL_RANK")
    if resolved.type != "cuda" or resolved.index is not None or local_rank is None:
        return resolved
    if not local_rank.strip().isdigit():
        raise ConfigError(f"LOCAL_RANK must be a non-negative integer, got {local_rank!r}")
    return torch.device("cuda", int(local_rank))


def load_for_inference(
    model_dir: str | Path,
    bagel: bool = False,
    weights: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    overrides: dict | None = None,
    quantize: str = "none",
    *,
    device_map: str | None = None,
    max_memory: str | None = None,
):
    """(model in eval mode, vae, tokenizer) on ``device`` with parameters in ``dtype``.

    ``bagel=True`` reads a BAGEL-7B-MoT / UniGenDet checkpoint directory, with ``weights`` (a
    fine-tuned file) overriding its base weights; otherwise ``model_dir`` is our export (one safetensors
    file or shards with an index). ``model_dir`` may also be a Hugging Face hub id (local hub cache first).
    ``overrides`` replace model-config fields that do not change the weights (for BAGEL directories
    e.g. the VAE geometry, which BAGEL hard-codes to FLUX's). ``quantize`` (``8bit`` / ``4bit``, CUDA and the
    optional bitsandbytes package) loads on the CPU and quantizes the decoder projections on their way to the
    GPU (:mod:`unigendet.inference.quantize`). ``device_map`` (``auto``, ``balanced`` or layer ranges such as
    ``"0:0-13,1:14-27"``, with ``max_memory`` caps for the balanced forms) loads on the CPU and splits the model over
    several devices (:mod:`unigendet.inference.device_map`); ``dtype`` auto then follows the map's input device."""
    if device_map is not None:
        if quantize != "none":
            raise ConfigError("device_map: cannot be combined with quantize (8-/4-bit loading places the model on "
                              "one GPU)")
        check_device_map(device_map, max_memory, device)
        target = input_device(device_map)
    elif max_memory is not None:
        raise ConfigError("max_memory applies with device_map auto/balanced only")
    else:
        target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if quantize != "none":
        from unigendet.inference.quantize import QUANT_MODES, import_bitsandbytes

        if quantize not in QUANT_MODES:
            raise ValueError(f"quantize must be one of {QUANT_MODES}, got {quantize!r}")
        import_bitsandbytes()  # fail before reading any weights
        if target.type != "cuda":
            raise ValueError(f"quantize={quantize} runs on CUDA only (bitsandbytes kernels); the device is {target}")
        if torch_dtype == torch.float32:
            torch_dtype = torch.bfloat16  # the unquantized rest and the 4-bit compute dtype
    # Quantized and split models are assembled from a CPU copy, so the full model never occupies one GPU.
    load_device = torch.device("cpu") if quantize != "none" or device_map is not None else target
    model_dir = resolve_model_dir(model_dir)
    if bagel:
        from unigendet.checkpoint.bagel import load_bagel_checkpoint

        model, vae, tokenizer = load_bagel_checkpoint(model_dir, weights=weights, map_location=load_device,
                                                      dtype=torch_dtype, **(overrides or {}))
    else:
        from unigendet.checkpoint.export import load_model_directory

        if weights:
            raise ValueError("weights= overrides only apply to BAGEL/UniGenDet directories (bagel=True)")
        # Parameters only: RoPE's inv_freq and the sin-cos tables stay fp32 (as the BAGEL loader does).
        model, vae, tokenizer = load_model_directory(model_dir, map_location=str(load_device), dtype=torch_dtype,
                                                     **(overrides or {}))
    if quantize != "none":
        from unigendet.inference.quantize import quantize_decoder

        quantize_decoder(model, quantize, target, compute_dtype=torch_dtype)
    if device_map is not None:
        dispatch(model, vae, device_map, max_memory)  # the VAE goes with the input modules
        return model.eval(), vae, tokenizer
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
    dtype: str = "auto",
    overrides: dict | None = None,
    *,
    smsa: bool | None = None,
    posterior: Posterior | None = None,
    pre_resize_vae: bool | None = None,
    quantize: str = "none",
    device_map: str | None = None,
    max_memory: str | None = None,
) -> UniGenDetDetector:
    """A :class:`~unigendet.inference.detect.UniGenDetDetector` over a loaded model, seeing images as the
    run that produced it did (:func:`detector_preprocessing`; ``smsa``, ``posterior`` and
    ``pre_resize_vae`` override when given). ``device_map="auto"`` splits the model over the visible GPUs."""
    model_dir = resolve_model_dir(model_dir)
    model, vae, tokenizer = load_for_inference(model_dir, bagel, weights, device, dtype, overrides, quantize,
                                               device_map=device_map, max_memory=max_memory)
    preprocessing = detector_preprocessing(model_dir, bagel, smsa, posterior, pre_resize_vae)
    return UniGenDetDetector(model, vae, tokenizer, preprocessing)


def build_generator(model_dir: str | Path, bagel: bool = False, weights: str | Path | None = None,
                    device: str | None = None, dtype: str = "auto", overrides: dict | None = None,
                    quantize: str = "none", *, device_map: str | None = None,
                    max_memory: str | None = None) -> Generator:
    """A :class:`~unigendet.inference.generate.Generator` over a loaded model (``device_map``: see
    :func:`load_for_inference`)."""
    return Generator(*load_for_inference(model_dir, bagel, weights, device, dtype, overrides, quantize,
                                         device_map=device_map, max_memory=max_memory))


def require_paths(paths: dict[str, str | None]) -> None:
    """ConfigError naming the key of the first given path that does not exist (None: not given, not checked)."""
    for key, path in paths.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist")


@dataclass
class ModelSource:
    """Which trained model to load, and where."""

    path: str  # our exported model directory (or a hub id), or a BAGEL-7B-MoT / UniGenDet directory with bagel: true
    bagel: bool = False
    weights: str | None = None  # with bagel: a fine-tuned weights file overriding the directory's
    device: str | None = None  # default: cuda if available, else cpu
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # 8bit / 4bit: the decoder projections through bitsandbytes (optional package, CUDA only)
    quantize: Literal["none", "8bit", "4bit"] = "none"
    # Split over several devices: auto / balanced (every visible GPU, by bytes) or layer ranges "0:0-13,1:14-27"
    device_map: str | None = None
    max_memory: str | None = None  # with device_map auto/balanced: weight bytes per device, "0:20GiB,1:40GiB"

    def validate(self) -> None:
        if self.weights is not None and not self.bagel:
            raise ConfigError("weights overrides only apply to BAGEL/UniGenDet directories (bagel: true)")
        if self.device_map is not None:
            if self.quantize != "none":
                raise ConfigError(f"device_map: cannot be combined with quantize: {self.quantize} (8-/4-bit loading "
                                  "places the model on one GPU)")
            check_device_map(self.device_map, self.max_memory, self.device)
        elif self.max_memory is not None:
            raise ConfigError("max_memory applies with device_map auto/balanced only")
        if self.quantize != "none":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(f"quantize: {self.quantize} needs the optional bitsandbytes package "
                                  "(pip install bitsandbytes; CUDA only)")
            if self.device is not None and not self.device.startswith("cuda"):
                raise ConfigError(f"quantize: {self.quantize} runs on CUDA only, not device {self.device!r}")

    def check_inputs(self, key: str = "model") -> None:
        # A hub id is resolved when the model loads (local hub cache first), with its own clear error.
        path = None if looks_like_hub_id(self.path) and not Path(self.path).exists() else self.path
        require_paths({f"{key}.path": path, f"{key}.weights": self.weights})

    def load_kwargs(self) -> dict[str, Any]:
        return {"model_dir": self.path, "bagel": self.bagel, "weights": self.weights, "device": self.device,
                "dtype": self.dtype, "quantize": self.quantize, "device_map": self.device_map,
                "max_memory": self.max_memory}

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
