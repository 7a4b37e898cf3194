"""What every evaluation job records next to its scores: the weights it scored (a hash of every byte of the
weight files, :mod:`unigendet.utils.fingerprint`), seed, dtype, device, library versions, the git commit and the
job's resolved settings."""

from __future__ import annotations

import logging
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from unigendet.utils.fingerprint import weights_fingerprint

logger = logging.getLogger(__name__)

LIBRARIES = ("unigendet", "torch", "transformers", "diffusers", "deepspeed", "peft", "safetensors", "accelerate",
             "huggingface_hub")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source tree this package runs from (suffixed ``-dirty`` when tracked files differ),
    or ``"unknown"`` outside a git checkout or without git."""
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if Path(top).resolve() != root:  # an installed copy inside some other repository: not our commit
            return "unknown"
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head or "unknown"


def library_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed) of the libraries that decide numerics, plus python and the git
    commit. Read from package metadata, so nothing heavy (deepspeed) is imported."""
    versions = {name: _version(name) for name in LIBRARIES}
    versions["torch"] = torch.__version__
    versions["python"] = platform.python_version()
    versions["git_commit"] = git_commit()
    return versions


def run_provenance(settings: dict[str, Any], model_path: str | Path | None = None,
                   model: torch.nn.Module | None = None, seed: int | None = None) -> dict[str, Any]:
    """The provenance block of a report: ``settings`` (the job's resolved configuration) plus the
    checkpoint, its fingerprint, seed, the model's dtype/device and versions."""
    from unigendet import __version__

    record: dict[str, Any] = dict(settings)
    record["model"] = None if model_path is None else str(model_path)
    record["weights_sha256"] = weights_fingerprint(model_path)
    if seed is not None:
        record["seed"] = seed
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None:
            record["dtype"] = str(param.dtype).removeprefix("torch.")
            record["device"] = str(param.device)
    record["versions"] = {**library_versions(), "unigendet": __version__}
    return record
