"""Pure loss functions. Each takes the denominator it normalises by, so that the caller decides
how counts are reduced across ranks (the reference divides local sums by the global token count
over the world size, then lets gradient averaging finish the global mean)."""

from unigendet.losses.core import (
    alignment_loss,
    detection_loss,
    flow_matching_loss,
    token_ce_loss,
)
from unigendet.losses.flow import noised_latents, sample_flow_timesteps, shift_timesteps

__all__ = [
    "alignment_loss",
    "detection_loss",
    "flow_matching_loss",
    "noised_latents",
    "sample_flow_timesteps",
    "shift_timesteps",
    "token_ce_loss",
]
