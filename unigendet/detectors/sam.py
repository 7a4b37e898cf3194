"""Sharpness-Aware Minimisation (Foret et al., 2021) around any torch optimiser.

One SAM update takes two gradients: ``g`` at the weights ``w``, then ``g'`` at ``w + e`` with
``e = rho * g / ||g||`` (the norm over every parameter of the optimiser). The weights are put back to exactly
``w`` (a stored copy, not ``w + e - e``, which would round) and the base optimiser steps with ``g'``.
With ``rho = 0`` the two gradients coincide and SAM is the base optimiser.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SAM(torch.optim.Optimizer):
    """``SAM(params, torch.optim.Adam, rho=0.05, lr=1e-4)``: the base optimiser is built on SAM's param groups.

    Use :meth:`step` with a closure that zeroes nothing and returns the loss after calling ``backward`` (it is
    called once, at the perturbed weights), having run the first forward/backward yourself; or call
    :meth:`first_step` / :meth:`second_step` directly. ``last_perturbation_norm`` records ``||e||``.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.last_perturbation_norm = 0.0

    def _grad_norm(self) -> torch.Tensor:
        norms = [p.grad.detach().float().norm(2) for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not norms:
            return torch.zeros(())
        return torch.stack(norms).norm(2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + rho * g / ||g||`` (remembering ``w``)."""
        grad_norm = self._grad_norm()
        perturbation_sq = 0.0
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["w"] = p.detach().clone()
                e = p.grad * scale.to(p.grad.dtype)
                perturbation_sq += float(e.float().pow(2).sum())
                p.add_(e)
        self.last_perturbation_norm = perturbation_sq ** 0.5
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly, then step the base optimiser with the gradient taken at ``w + e``."""
        for group in self.param_groups:
            for p in group["params"]:
                if "w" in self.state[p]:
                    p.copy_(self.state[p].pop("w"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Both SAM half-steps; the gradients at ``w`` must already be in ``.grad``."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
