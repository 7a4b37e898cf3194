"""Content fingerprints of checkpoints: a sha256 over every byte of their weight files.

Hashing a 30 GB checkpoint takes the better part of a minute or more (sha256 runs at about 0.7 GiB/s on one
core, before any disk limit), so fingerprints are cached by (absolute path, size, mtime):
in memory for the process and in a small JSON file (``fingerprints.json`` under ``$UNIGENDET_CACHE_DIR``,
default ``~/.cache/unigendet``) across processes. A file rewritten in place changes its mtime and is hashed
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from unigendet.utils.hub import looks_like_hub_id

logger = logging.getLogger(__name__)

# Main weights, in the order the loaders prefer them, then the VAE files that ship next to them.
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
VAE_FILES = ("vae.safetensors", "ae.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"
CACHE_ENV = "UNIGENDET_CACHE_DIR"
CACHE_FILE = "fingerprints.json"
_CHUNK = 8 << 20
_MEMORY: dict[tuple[str, int, int], str] = {}


def _cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unigendet") / CACHE_FILE


def _cache_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _read_disk_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_disk_cache(entry: str, digest: str) -> None:
    path = _cache_path()
    data = _read_disk_cache()
    data[entry] = digest
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError as err:  # a read-only home must not fail an evaluation
        logger.warning("could not write the fingerprint cache %s: %s", path, err)


def hash_file(path: Path, chunk_bytes: int = _CHUNK) -> str:
    """sha256 of every byte of ``path``, read in ``chunk_bytes`` pieces (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a whole file, from the cache when its path, size and mtime are unchanged."""
    path = Path(path)
    key = _cache_key(path)
    if key in _MEMORY:
        return _MEMORY[key]
    entry = json.dumps(key)
    digest = _read_disk_cache().get(entry)
    if digest is None:
        logger.info("hashing %s (%.1f GB) for the report's provenance", path, key[1] / 1e9)
        digest = hash_file(path)
        _write_disk_cache(entry, digest)
    _MEMORY[key] = digest
    return digest


def _local(path: str | Path) -> Path | None:
    """``path`` when it exists, else the local hub-cache snapshot of a hub id (never downloads), else None."""
    p = Path(path)
    if p.exists():
        return p
    if not looks_like_hub_id(str(path)):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not cached: the report records no fingerprint rather than failing
        return None


def weight_files(path: str | Path) -> list[Path]:
    """The files whose bytes decide a checkpoint's outputs. ``path`` is a weights file, a directory or a hub id
    (its cached snapshot):
    its main weights (``model.safetensors``, else ``ema.safetensors``, else the shards one
    ``*.safetensors.index.json`` names) plus the VAE file next to them."""
    p = _local(path)
    if p is None:
        return []
    if p.is_file():
        return [p]
    main = next(([p / n] for n in WEIGHT_FILES if (p / n).is_file()), None)
    if main is None:
        indexes = sorted(p.glob("*" + INDEX_SUFFIX))
        if indexes:
            weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
            main = [indexes[0]] + [p / name for name in sorted(set(weight_map.values()))]
    if not main:
        return []
    return main + [p / n for n in VAE_FILES if (p / n).is_file()]


def weights_fingerprint(path: str | Path | None) -> str | None:
    """sha256 (64 hex digits) over every byte of a checkpoint's weight files (:func:`weight_files`): the
    file's own sha256 for a single file, else the sha256 of the ``name  digest`` lines of its files. None when
    ``path`` is not given or holds no weights."""
    if not path:
        return None
    files = weight_files(path)
    if not files:
        return None
    if len(files) == 1:
        return file_fingerprint(files[0])
    lines = "".join(f"{f.name}  {file_fingerprint(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()
