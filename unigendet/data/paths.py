"""Where data lives on disk: image paths kept inside their root, data-file globs, and the start-up check
that a source's configured paths exist.

Image paths read from dataset files (a FakeClue entry's ``image``, a table's path column) are untrusted
input. A relative path must stay inside its root once ``..`` and symlinks are resolved, otherwise the record
is a bad sample ``path_outside_root``; an absolute path is a bad sample ``absolute_path`` unless the source
allows absolute paths (``allow_absolute_paths``, for tables that list files anywhere, such as `datasets`
directories built from local files). A dataset file can therefore never make training read
``/etc/passwd`` or ``../../secret/x.png``.
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unigendet.data.quality import BadSample

if TYPE_CHECKING:
    from unigendet.data.pipeline import SourceConfig

_GLOB_CHARS = set("*?[")


def check_image_name(name: str, where: str, allow_absolute: bool = False) -> None:
    """Checks of an image path that need no file access; BadSample naming the problem.

    A NUL byte or a lone surrogate (not valid Unicode, so neither a file name nor a record key) is
    ``malformed_entry``; an absolute path is ``absolute_path`` unless ``allow_absolute``; a relative path
    whose ``..`` components climb above its root is ``path_outside_root``.
    """
    if "\x00" in name:
        raise BadSample("malformed_entry", f"{where}: image path {name!r} contains a NUL byte")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample("malformed_entry", f"{where}: image path {name!r} is not valid Unicode") from None
    if os.path.isabs(name):
        if not allow_absolute:
            raise BadSample("absolute_path", f"{where}: absolute image path {name!r} (allow_absolute_paths is off)")
        return
    if posixpath.normpath(name).split("/", 1)[0] == "..":
        raise BadSample("path_outside_root", f"{where}: image path {name!r} climbs out of the image root")


def resolve_image_path(root: Path, name: str, where: str, allow_absolute: bool = False) -> Path:
    """The file image path ``name`` designates: ``root / name`` with symlinks resolved, which must lie inside
    ``root`` (itself already resolved with ``Path.resolve``); an allowed absolute path as it is.

    BadSample as in :func:`check_image_name`, ``path_outside_root`` for a path that leaves the root through a
    symlink, ``unreadable_image`` for a symlink loop. The file need not exist (that shows when it is opened).
    """
    check_image_name(name, where, allow_absolute)
    if os.path.isabs(name):
        return Path(name)
    try:
        resolved = (root / name).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise BadSample("unreadable_image", f"{where}: image path {name!r}: {err}") from None
    if not resolved.is_relative_to(root):
        raise BadSample("path_outside_root", f"{where}: image path {name!r} resolves to {resolved}, outside {root}")
    return resolved


def expand_data_files(data_files: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files and directories named by ``data_files`` (globs expanded, sorted); FileNotFoundError naming any
    entry that matches nothing."""
    entries = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    if not entries:
        raise ValueError("data_files is empty")
    paths: list[Path] = []
    for entry in entries:
        text = str(entry)
        # An existing path is taken literally even if its name contains glob characters ("[1]").
        if Path(text).exists():
            paths.append(Path(text))
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {text}")
            paths += [Path(m) for m in matches]
        else:
            raise FileNotFoundError(f"data file not found: {text}")
    return paths


def _file_problem(path: str) -> str | None:
    if not Path(path).is_file():
        return f"no such file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    return None


def check_source_paths(source: SourceConfig, key: str) -> list[str]:
    """Problems with the paths source config ``source`` names, each message starting with the config key
    (``key`` is the source's own, e.g. ``data.sources.fakeclue``); empty when every path is usable.

    Meant for start-up (and dry runs), so that a missing file is a configuration error before any work,
    not an exception inside the first data worker. Missing *values* are ``source.validate()``'s concern.
    """
    problems: list[str] = []
    if source.kind == "fakeclue" and source.json_path:
        problem = _file_problem(source.json_path)
        if problem:
            problems.append(f"{key}.json_path: {problem}")
    if source.kind == "t2i":
        for i, entry in enumerate(source.data_files):
            try:
                expand_data_files([entry])
            except FileNotFoundError as err:
                problems.append(f"{key}.data_files[{i}]: {err}")
    if source.image_root and not Path(source.image_root).is_dir():
        problems.append(f"{key}.image_root: not a directory: {source.image_root}")
    return problems
