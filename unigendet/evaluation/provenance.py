"""What every evaluation job records next to its scores: the weights it scored (a content hash),
seed, dtype, device, library versions and the job's resolved settings."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
_HASH_BYTES = 64 * 2**20


def weights_fingerprint(path: str | Path | None) -> str | None:
    """sha256 (16 hex digits) of a checkpoint's weights file, reading its first 64 MiB (enough to tell
    checkpoints apart without reading 30 GB). ``path`` is a weights file or a directory holding
    ``model.safetensors`` / ``ema.safetensors`` (or, for BAGEL directories, ``ema.safetensors``)."""
    if not path:
        return None
    p = Path(path)
    target = next((p / n for n in WEIGHT_FILES if (p / n).is_file()), p if p.is_file() else None)
    if target is None:
        return None
    digest = hashlib.sha256()
    with open(target, "rb") as fh:
        digest.update(fh.read(_HASH_BYTES))
    return digest.hexdigest()[:16]


def run_provenance(settings: dict[str, Any], model_path: str | Path | None = None,
                   model: torch.nn.Module | None = None, seed: int | None = None) -> dict[str, Any]:
    """The provenance block of a report: ``settings`` (the job's resolved configuration) plus the
    checkpoint, its hash, seed, the model's dtype/device and versions."""
    from unigendet import __version__

    record: dict[str, Any] = dict(settings)
    record["model"] = None if model_path is None else str(model_path)
    record["weights_sha256_head"] = weights_fingerprint(model_path)
    if seed is not None:
        record["seed"] = seed
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None:
            record["dtype"] = str(param.dtype).removeprefix("torch.")
            record["device"] = str(param.device)
    record["versions"] = {"unigendet": __version__, "torch": torch.__version__, "python": platform.python_version()}
    return record
