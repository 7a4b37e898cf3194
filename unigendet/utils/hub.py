"""Model directories named by a local path or a Hugging Face hub id (``owner/name``).

A local directory wins. Otherwise a hub id is looked up in the local hub cache first (works offline); when it
is not cached and the hub is reachable (``HF_HUB_OFFLINE`` unset) it is downloaded. Every failure is a
FileNotFoundError that names the id and the command that downloads it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, not at import time, so a changed environment is seen)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def download_hint(repo_id: str) -> str:
    return f"download it first with `huggingface-cli download {repo_id} --local-dir <dir>` and pass <dir>"


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      allow_patterns: list[str] | None = None) -> Path:
    """The local directory of ``name_or_path``: itself when it is a directory, else the hub cache's snapshot
    of the hub id (downloaded when missing and the hub is not offline)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"model directory {text} is a file, not a directory")
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"model directory {text} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=True, allow_patterns=allow_patterns))
    except Exception as err:  # huggingface_hub raises several types for "not cached"
        cached_error = err
    if hub_offline():
        raise FileNotFoundError(
            f"model {text!r} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            f"{download_hint(text)}") from cached_error
    logger.info("%s is not cached: downloading it from the Hugging Face hub", text)
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=allow_patterns))
    except Exception as err:
        raise FileNotFoundError(f"model {text!r} is neither a local directory nor downloadable from the Hugging "
                                f"Face hub ({type(err).__name__}: {err}); {download_hint(text)}") from err
