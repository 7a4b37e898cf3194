"""The hand-written RMSNorm backward against transformers' Qwen2RMSNorm and autograd's numerical gradient."""

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from unigendet.ops.elementwise import RMSNorm, _RMSNormFunction


def _pair(dim, dtype):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(dim, eps=1e-6), Qwen2RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(theirs.weight)
    return ours.to(dtype), theirs.to(dtype)


@pytest.mark.parametrize("shape", [(37, 64), (5, 4, 16)])
def test_rms_norm_matches_qwen2_forward_and_backward(shape):
    ours, theirs = _pair(shape[-1], torch.float32)
    x = (torch.randn(shape) * 3).requires_grad_()
    grad = torch.randn(shape)
    outs, grads = [], []
    for module in (ours, theirs):
        y = module(x)
        gx, gw = torch.autograd.grad(y, (x, module.weight), grad)
        outs.append(y)
        grads.append((gx, gw))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-5)


def test_rms_norm_gradcheck_float64():
    weight = torch.empty(8, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-6), (x, weight))


def test_rms_norm_bf16_keeps_dtype_and_stays_close():
    ours, theirs = _pair(32, torch.bfloat16)
    x = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours, y_theirs, atol=2e-2, rtol=2e-2)
    y_ours.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.bfloat16
