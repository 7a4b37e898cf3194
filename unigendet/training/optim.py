"""Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to min_lr_ratio."""

from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> Callable[[int], float]:
    """LambdaLR factor for optimizer step ``step`` (0-based: the first step uses factor(0))."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if decay == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif decay == "linear":
            shape = 1.0 - progress
        else:
            raise ValueError(f"unknown decay {decay!r}")
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor
