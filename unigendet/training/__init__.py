"""Training: config, builders, the DeepSpeed trainer."""

from __future__ import annotations


def run_training(config_path: str, overrides: list[str] | None = None):
    """Load and validate the config, train, and return the final TrainState."""
    from unigendet.training.config import load_train_config
    from unigendet.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    return Trainer(cfg).train()
