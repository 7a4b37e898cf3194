"""RMSNorm with a hand-written backward pass.

It computes the same function as transformers' ``Qwen2RMSNorm`` (equal up to fp32 rounding) with fewer
intermediate tensors: autograd's generic backward of the composed ops (cast, square, mean, rsqrt, two
products) saves every intermediate and runs one kernel per op; this one saves the input and the inverse
RMS only and computes both gradients in a few elementwise passes.
"""

from __future__ import annotations

import torch
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype from fp32 up."""
    return torch.promote_types(x.dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x / sqrt(mean(x^2, -1) + eps))`` computed in at least fp32, the normalized value cast back to
    ``x``'s dtype before the gain (as ``Qwen2RMSNorm`` does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(_compute_dtype(x))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(rstd.dtype)
        xhat = x32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.to(rstd.dtype) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad.to(rstd.dtype) * weight.to(rstd.dtype)
            # d/dx of x * rstd: rstd * (g - xhat * mean(g * xhat)).
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learnt gain ``weight`` (BAGEL/Qwen2 parameter
    name), computed in fp32 with a fused backward."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
