"""The YAML recipes shipped inside the package (``unigendet/configs``; a source checkout links them as
``configs/``), so library code can name a recipe without knowing where the repository is."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from unigendet.config.loader import ConfigError


def recipe_path(relative: str) -> Path:
    """Path of a shipped recipe, e.g. ``recipe_path("train/gduf_demo.yaml")``; an unknown name is a ConfigError."""
    path = Path(str(resources.files("unigendet") / "configs" / relative))
    if not path.is_file():
        raise ConfigError(f"no shipped recipe {relative!r} (looked for {path})")
    return path
