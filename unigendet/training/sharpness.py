"""Sharpness-Aware Minimisation (SAM) around the DeepSpeed engine's optimiser step.

One SAM step takes two gradients on the same batch: ``g`` at the weights ``w``, then ``g'`` at ``w + e`` with
``e = rho * g / ||g||`` (the norm over every trainable parameter). The weights are put back to exactly ``w`` (a
stored copy) and the engine's optimiser steps with ``g'``. This is the update of
:class:`unigendet.detectors.sam.SAM`, split so that both backward passes go through the engine
(which averages gradients over ranks): the trainer runs the first backward, :meth:`SharpnessStep.ascend`,
the second forward/backward, :meth:`SharpnessStep.restore`, then the engine's step.

Both gradients must be whole tensors in ``param.grad`` when the engine's backward returns: ZeRO stage 0 without
gradient accumulation (``TrainConfig`` refuses other combinations).
"""

from __future__ import annotations

import torch
from torch import nn


class SharpnessStep:
    """The ascent to ``w + e`` and the way back, over ``params`` (the trainable ones)."""

    def __init__(self, params: list[nn.Parameter], rho: float):
        if rho <= 0:
            raise ValueError(f"SAM radius rho must be > 0, got {rho}")
        self.params = params
        self.rho = rho
        self.saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.last_perturbation_norm = 0.0

    @torch.no_grad()
    def ascend(self) -> None:
        """Move every parameter with a gradient by ``rho * g / ||g||`` (remembering ``w``) and clear the gradients."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return
        norm = torch.stack([p.grad.detach().float().norm(2) for p in with_grad]).norm(2)
        scale = self.rho / (norm + 1e-12)
        squared = torch.zeros((), device=norm.device)
        for p in with_grad:
            self.saved.append((p, p.detach().clone()))
            e = p.grad * scale.to(p.grad.dtype)
            squared += e.float().pow(2).sum()
            p.add_(e)
        self.last_perturbation_norm = float(squared.sqrt())
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def restore(self) -> None:
        """Put ``w`` back exactly (the gradients of the second pass stay for the optimiser)."""
        for p, w in self.saved:
            p.copy_(w)
        self.saved.clear()
