"""State dicts as (optionally sharded) safetensors files, following the Hugging Face convention.

A state that fits in ``max_shard_size`` is one ``{prefix}.safetensors``; a larger one is
``{prefix}-00001-of-0000N.safetensors`` ... plus ``{prefix}.safetensors.index.json`` (``{"metadata":
{"total_size": bytes}, "weight_map": {key: shard file}}``), the layout ``transformers`` and the hub tooling
read. The split itself is huggingface_hub's ``split_torch_state_dict_into_shards``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX_SUFFIX = ".safetensors.index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB``, ``500MiB``, ``1e9``-style integers; ValueError naming the text otherwise."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ValueError(f"shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cast_floating(state: dict[str, torch.Tensor], dtype: str | torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors in ``dtype`` (None: unchanged); integer tensors are never cast."""
    target = resolve_dtype(dtype)
    if target is None:
        return state
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def _stale_files(directory: Path, prefix: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(prefix)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?$")
    return [p for p in directory.iterdir() if pattern.match(p.name)]


def save_sharded(state: dict[str, torch.Tensor], directory: str | Path, prefix: str = "model",
                 max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``state`` under ``directory`` as ``{prefix}.safetensors`` or shards + index (see the module
    docstring); ``max_shard_size`` None never shards. Earlier files of the same prefix are removed first, so
    a directory never holds both a single file and an index. Returns the files written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in _stale_files(directory, prefix):
        stale.unlink()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": "pt", **(metadata or {})}
    if max_shard_size is None:
        save_file(state, str(directory / f"{prefix}.safetensors"), metadata=meta)
        return [directory / f"{prefix}.safetensors"]
    split = split_torch_state_dict_into_shards(state, filename_pattern=prefix + "{suffix}.safetensors",
                                               max_shard_size=parse_size(max_shard_size))
    written = []
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(directory / filename), metadata=meta)
        written.append(directory / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        index_path = directory / f"{prefix}{INDEX_SUFFIX}"
        index_path.write_text(json.dumps(index, indent=2))
        written.append(index_path)
        logger.info("wrote %d shards of at most %s to %s", len(split.filename_to_tensors), max_shard_size, directory)
    return written


def has_weights(directory: str | Path, prefix: str = "model") -> bool:
    directory = Path(directory)
    return (directory / f"{prefix}.safetensors").is_file() or (directory / f"{prefix}{INDEX_SUFFIX}").is_file()


def load_sharded(directory: str | Path, prefix: str = "model", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_sharded`: the single file, else every shard its index names (each key exactly
    where the index says). FileNotFoundError naming both layouts when neither is there."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    single = directory / f"{prefix}.safetensors"
    if single.is_file():
        return load_file(str(single), device=device)
    index_path = directory / f"{prefix}{INDEX_SUFFIX}"
    if not index_path.is_file():
        raise FileNotFoundError(f"{directory} has neither {single.name} nor {index_path.name}")
    weight_map = json.loads(index_path.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index_path} names {shard}, which does not exist")
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        expected = {k for k, v in weight_map.items() if v == shard}
        if keys != expected:
            extra, missing = sorted(keys - expected), sorted(expected - keys)
            raise ValueError(f"{shard} disagrees with {index_path.name}: unexpected {extra[:5]}, missing {missing[:5]}")
        state.update(load_file(str(path), device=device))
    return state
