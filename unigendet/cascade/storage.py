"""A cascade on disk: a directory with ``cascade.json`` (format, version, the whole :class:`CascadeConfig` with its
thresholds, and the calibration record), optionally with the stage-1 and spectral detectors copied inside.

Stage directories inside the cascade directory are stored as paths relative to it, so the directory can be moved;
others are stored as given (absolute when they were absolute). The UniGenDet verifier's model is referenced,
never copied. :func:`load_cascade` checks every stage directory before loading anything heavy and names the key of
a missing or wrong one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from unigendet.cascade.config import CascadeConfig, Thresholds
from unigendet.cascade.pipeline import Cascade
from unigendet.cascade.verifiers import build_verifier
from unigendet.config.loader import ConfigError, from_dict, to_dict
from unigendet.detectors.base import load_detector
from unigendet.inference.loading import resolve_device

logger = logging.getLogger(__name__)

CASCADE_FILE = "cascade.json"
FORMAT_NAME = "unigendet-cascade"
FORMAT_VERSION = 1
_STAGE_KEYS = ("binary", "spectral", "binary_backbone")


def build_cascade(config: CascadeConfig, calibration: dict | None = None, device: str | None = None) -> Cascade:
    """Load every stage ``config`` names (stage 1 and spectral on ``device``, default ``config.device``)."""
    config.check_inputs()
    target = resolve_device(device or config.device)
    binary = load_detector(config.binary, backbone_path=config.binary_backbone).to(target)
    spectral = load_detector(config.spectral).to(target)
    verifier = build_verifier(config.verifier, config.feed_spectral_map, device=device or config.device)
    cascade = Cascade(binary, spectral, verifier, replace(config.thresholds), config.mllm_mapping,
                      config.batch_size, calibration)
    cascade.config = config
    return cascade


def _relative(path: str | None, directory: Path) -> str | None:
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(directory.resolve()))
    except ValueError:
        return path


def _absolute(path: str | None, directory: Path) -> str | None:
    if path is None or Path(path).is_absolute():
        return path
    return str(directory / path)


def save_cascade(directory: str | Path, config: CascadeConfig, calibration: dict | None = None,
                 copy_stages: bool = False) -> Path:
    """Write ``<directory>/cascade.json`` (``copy_stages``: copy the stage-1 and spectral detector directories in
    first, as ``binary/`` and ``spectral/``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if copy_stages:
        for name in ("binary", "spectral"):
            source, target = Path(getattr(config, name)), directory / name
            if source.resolve() != target.resolve():
                shutil.copytree(source, target, dirs_exist_ok=True)
            config = replace(config, **{name: str(target)})
    data = to_dict(config)
    for key in _STAGE_KEYS:
        data[key] = _relative(data[key], directory)
    model = data["verifier"].get("model")
    if model is not None:
        model["path"] = _relative(model["path"], directory)
        model["weights"] = _relative(model.get("weights"), directory)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": data, "calibration": calibration}
    path = directory / CASCADE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    logger.info("saved cascade to %s", directory)
    return path


def read_cascade_config(directory: str | Path) -> tuple[CascadeConfig, dict | None]:
    """(config with absolute stage paths, calibration record) of a saved cascade; ConfigError naming the file and
    the key when it is not one or a stage directory is missing or wrong."""
    directory = Path(directory)
    path = directory / CASCADE_FILE
    if not path.is_file():
        raise ConfigError(f"{directory}: not a saved cascade (no {CASCADE_FILE})")
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: format {doc.get('format')!r} v{doc.get('version')!r}, expected {FORMAT_NAME!r} "
                          f"v{FORMAT_VERSION}")
    data = dict(doc.get("config") or {})
    for key in _STAGE_KEYS:
        data[key] = _absolute(data.get(key), directory)
    verifier = dict(data.get("verifier") or {})
    if verifier.get("model"):
        model = dict(verifier["model"])
        model["path"] = _absolute(model.get("path"), directory)
        model["weights"] = _absolute(model.get("weights"), directory)
        verifier["model"] = model
    data["verifier"] = verifier
    try:
        config = from_dict(CascadeConfig, data)
        config.check_inputs("config")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config, doc.get("calibration")


def load_cascade(directory: str | Path, device: str | None = None) -> Cascade:
    """The cascade saved in ``directory``, every stage loaded (on ``device`` when given)."""
    config, calibration = read_cascade_config(directory)
    cascade = build_cascade(config, calibration, device=device)
    cascade.directory = Path(directory)
    return cascade


def thresholds_of(directory: str | Path) -> Thresholds:
    """The thresholds a saved cascade routes with."""
    return read_cascade_config(directory)[0].thresholds
