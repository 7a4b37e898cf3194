"""Checkpoint manifests: every file of a checkpoint directory with its size and SHA-256.

The manifest is written last (before the ``COMPLETE`` marker); resuming checks it before any file of the
checkpoint is read, so a torn, truncated or swapped file is found and named instead of failing deep in a
loader. It guards integrity, not authenticity: whoever can write the directory can rewrite the manifest
(checkpoints are trusted input).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FORMAT = 1
# Written after the manifest, so not listed in it.
UNLISTED = frozenset({MANIFEST, COMPLETE})
_CHUNK = 1 << 22


def list_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``directory`` except the unlisted ones, sorted."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = Path(root, name).relative_to(directory).as_posix()
            if rel not in UNLISTED:
                found.append(rel)
    return sorted(found)


def file_entry(directory: Path, rel: str, checksum: bool = True) -> dict[str, Any]:
    """``{"path", "size", "sha256"}`` of one file; the file is also flushed to disk (fsync)."""
    path = directory / rel
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if checksum:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
        os.fsync(fh.fileno())
        size = os.fstat(fh.fileno()).st_size
    return {"path": rel, "size": size, "sha256": digest.hexdigest() if checksum else None}


def write_json_durably(path: Path, data: Any) -> None:
    with path.open("w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int, entries: list[dict[str, Any]]) -> None:
    write_json_durably(directory / MANIFEST, {"format": FORMAT, "step": step,
                                              "files": sorted(entries, key=lambda e: e["path"])})


def read_manifest(directory: Path) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(entries, None) or (None, the problem): missing or unreadable manifest, a path that leaves the
    directory, or a file on disk that the manifest does not list."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, f"{MANIFEST} is missing"
    try:
        data = json.loads(path.read_text())
        entries = data["files"]
        if data.get("format") != FORMAT or not isinstance(entries, list):
            raise ValueError(f"unsupported format {data.get('format')!r}")
        for entry in entries:
            _check_entry(entry)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST} is unreadable: {err}"
    unexpected = sorted(set(list_files(directory)) - {e["path"] for e in entries})
    if unexpected:
        return None, f"{unexpected[0]} is not in {MANIFEST} (unexpected file)"
    return entries, None


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("size"), int):
        raise ValueError(f"bad entry {entry!r}")
    rel = PurePosixPath(entry["path"])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"path {entry['path']!r} leaves the checkpoint directory")


def verify_entries(directory: Path, entries: list[dict[str, Any]], checksum: bool = True) -> str | None:
    """The first problem with ``entries`` (a missing file, a size or checksum mismatch), or None."""
    for entry in entries:
        rel = entry["path"]
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{rel} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
        if checksum and entry.get("sha256"):
            actual = file_entry(directory, rel, checksum=True)["sha256"]
            if actual != entry["sha256"]:
                return f"{rel} does not match its SHA-256 in the manifest (corrupted)"
    return None
