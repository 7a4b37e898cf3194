"""Optional 8-bit / 4-bit loading of the MoT decoder through bitsandbytes (an optional extra, CUDA only).

Only the decoder layers' linear projections (both experts' q/k/v/o and MLPs: about 90 % of BAGEL-7B-MoT's
weights) are quantized: LLM.int8 (``8bit``) or NF4 with the compute dtype of the rest of the model (``4bit``).
Embeddings, ``lm_head``, norms, the ViT, the connector, the latent bridges, the heads and the VAE keep their
dtype: they are a small share of the memory and the most precision-sensitive. bitsandbytes is imported only
when a quantized mode is asked for.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "8bit", "4bit")


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("8-bit and 4-bit loading needs the optional bitsandbytes package (CUDA only): "
                          "pip install bitsandbytes") from err
    return bitsandbytes


def _quantized_linear(bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    bias = linear.bias is not None
    if mode == "8bit":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                  threshold=6.0)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=compute_dtype,
                                quant_type="nf4")
    new.load_state_dict(linear.state_dict())
    return new.requires_grad_(False)


def quantize_decoder(model: nn.Module, mode: str, device: torch.device,
                     compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Quantize ``model``'s decoder projections (``model`` on the CPU, so the full-precision weights never
    occupy the GPU) and move the whole model to ``device``: bitsandbytes quantizes each layer as it moves to
    the GPU. Returns how many linear layers were replaced."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
    if mode == "none":
        model.to(device)
        return 0
    bnb = import_bitsandbytes()
    if device.type != "cuda":
        raise ValueError(f"quantize={mode} runs on CUDA only (bitsandbytes kernels); the device is {device}")
    replaced: list[nn.Module] = []
    for layer in model.language_model.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not nn.Linear:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            new = _quantized_linear(bnb, module, mode, compute_dtype).to(device)
            setattr(parent, child, new)
            replaced.append(new)
    _move_unquantized(model, device, {id(m) for m in replaced})
    logger.info("quantized %d decoder projections to %s on %s", len(replaced), mode, device)
    return len(replaced)


def _move_unquantized(model: nn.Module, device: torch.device, quantized: set[int]) -> None:
    """Every parameter and buffer outside the quantized layers to ``device`` (``model.to`` would also touch the
    quantized weights, which bitsandbytes does not allow for 8-bit layers)."""
    for module in model.modules():
        if id(module) in quantized:
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
