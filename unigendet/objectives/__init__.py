"""Training objectives ("tasks"): batch -> (total loss, metrics). The only place model outputs meet losses."""

from unigendet.objectives.common import LatentInputs, Objective, prepare_latents
from unigendet.objectives.gduf import GDUFLossConfig, GDUFObjective

__all__ = ["GDUFLossConfig", "GDUFObjective", "LatentInputs", "Objective", "prepare_latents"]
