"""BAGEL's on-disk data formats: JSON-encoded caption dicts in text-to-image parquet files, and the
``dataset_info`` + data-YAML pair that names BAGEL's training sets, converted to our ``data:`` sources.

Caption dicts
    BAGEL's T2I parquet files hold a ``captions`` column whose cell is a JSON object mapping a caption
    name (e.g. a captioner) to a caption. BAGEL draws one of them at random on every read. Here the choice is
    reproducible instead: the non-blank captions are ordered by name and caption number
    ``sha256("unigendet-caption:{seed}:{row key}") mod count`` is used, so every rank, worker and resumed run
    sees the same caption for the same row, and another seed gives another draw.

dataset_info
    BAGEL names datasets in a Python module (``DATASET_INFO = {group: {name: {data_dir, jsonl_path, ...}}}``)
    and chooses groups, weights and transforms in a YAML file (``{group: {dataset_names, weight,
    is_mandatory, num_used_data, image_transform_args}}``). :func:`convert_bagel_data_config` reads both
    (the module's dict literal is parsed, never executed; a JSON or YAML file with the same dict works too)
    and returns our data-config sections: ``t2i_pretrain`` sets become ``t2i`` sources over ``data_dir``'s
    parquet files with JSON caption dicts, ``vlm_sft`` sets become ``fakeclue`` sources over their JSONL
    annotations (entries must carry FakeClue's ``label``), each set weighted by its group's weight shared
    equally among the group's sets. Groups we have no sample type for (``unified_edit``) are rejected with the
    group named.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unigendet.config.loader import ConfigError
from unigendet.data.quality import BadSample

logger = logging.getLogger(__name__)

CAPTION_FORMATS = ("text", "json_dict")
_SUPPORTED_GROUPS = ("t2i_pretrain", "vlm_sft")
# BAGEL's transform arguments -> our TransformConfig fields.
_TRANSFORM_KEYS = {"max_image_size": "max_size", "min_image_size": "min_size", "image_stride": "stride",
                   "max_pixels": "max_pixels"}
# BAGEL's defaults when its YAML leaves a transform argument out (max_pixels: 14 * 14 * 9 * 1024 for the VAE path).
_TRANSFORM_DEFAULTS = {
    "vae_transform": {"max_size": 1024, "min_size": 512, "stride": 16, "max_pixels": 1_806_336},
    "vit_transform": {"max_size": 980, "min_size": 224, "stride": 14, "max_pixels": 2_007_040},
}


def caption_index(key: str, seed: int, count: int) -> int:
    """Which of ``count`` captions row ``key`` uses under ``seed`` (stable across processes and Python
    versions, unlike ``hash``)."""
    digest = hashlib.sha256(f"unigendet-caption:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % count


def caption_candidates(cell: Any, key: str) -> list[str]:
    """The non-blank captions of a caption-dict cell (a JSON object string, or an already decoded mapping),
    ordered by caption name; BadSample ``malformed_entry`` for a cell that is not such an object."""
    if isinstance(cell, (bytes, bytearray)):
        cell = bytes(cell).decode("utf-8", errors="replace")
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as err:
            raise BadSample("malformed_entry", f"{key}: captions cell is not valid JSON ({err})") from None
    if isinstance(cell, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in cell):
        cell = dict(cell)  # a parquet map column reads back as (key, value) pairs
    if not isinstance(cell, Mapping):
        raise BadSample("malformed_entry", f"{key}: captions cell is a {type(cell).__name__}, not a JSON object")
    return [text for _, text in sorted(cell.items(), key=lambda kv: str(kv[0]))
            if isinstance(text, str) and text.strip()]


def choose_caption(cell: Any, key: str, seed: int) -> str:
    """One caption of a caption-dict cell (:func:`caption_candidates`), chosen by :func:`caption_index`;
    BadSample ``empty_caption`` when no caption is non-blank."""
    captions = caption_candidates(cell, key)
    if not captions:
        raise BadSample("empty_caption", f"{key}: the captions object holds no non-blank caption")
    return captions[caption_index(key, seed, len(captions))]


# ------------------------------------------------------------------------------------------------
# dataset_info


def _literal_assignment(path: Path, name: str) -> Any:
    """The literal value assigned to ``name`` at the top level of a Python file, parsed without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as err:
        raise ConfigError(f"{path}: not valid Python ({err})") from err
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError as err:
                raise ConfigError(f"{path}: {name} is not a plain literal ({err})") from err
    raise ConfigError(f"{path}: no top-level {name} = {{...}} assignment")


def read_dataset_info(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {dataset name: info}}`` from BAGEL's ``dataset_info.py`` (its ``DATASET_INFO``) or a JSON /
    YAML file holding the same mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset_info file not found: {path}")
    if path.suffix == ".py":
        info = _literal_assignment(path, "DATASET_INFO")
    else:
        try:
            info = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid JSON/YAML ({err})") from err
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise ConfigError(f"{path}: expected {{group: {{dataset name: {{data_dir, ...}}}}}}")
    return info


def _transform(args: Any, where: str) -> dict[str, int] | None:
    if args is None:
        return None
    if not isinstance(args, dict):
        raise ConfigError(f"{where}.image_transform_args must be a mapping")
    return {ours: int(args[theirs]) for theirs, ours in _TRANSFORM_KEYS.items() if theirs in args}


def _t2i_source(name: str, info: dict[str, Any], weight: float, mandatory: bool) -> dict[str, Any]:
    data_dir = info.get("data_dir")
    if not data_dir:
        raise ConfigError(f"dataset_info.t2i_pretrain.{name}.data_dir is missing")
    return {"kind": "t2i", "weight": weight, "mandatory": mandatory,
            "data_files": [str(Path(data_dir) / "*.parquet")], "image_column": "image",
            "caption_column": "captions", "caption_format": "json_dict"}


def _vlm_source(name: str, info: dict[str, Any], weight: float, mandatory: bool) -> dict[str, Any]:
    missing = [k for k in ("jsonl_path", "data_dir") if not info.get(k)]
    if missing:
        raise ConfigError(f"dataset_info.vlm_sft.{name}.{missing[0]} is missing")
    return {"kind": "fakeclue", "weight": weight, "mandatory": mandatory, "json_path": str(info["jsonl_path"]),
            "image_root": str(info["data_dir"])}


def convert_bagel_data_config(dataset_info: str | Path | dict, data_yaml: str | Path | dict) -> dict[str, Any]:
    """Our data-config sections (``sources`` and, where BAGEL's YAML sets them, ``vae_transform`` /
    ``vit_transform``) from BAGEL's ``dataset_info`` and data YAML (paths or already loaded mappings).
    ``num_used_data`` (BAGEL's per-set file counts for worker sharding) has no counterpart: our sharding
    covers every record, so it is ignored with a log line."""
    info = dataset_info if isinstance(dataset_info, dict) else read_dataset_info(dataset_info)
    if isinstance(data_yaml, dict):
        groups = data_yaml
    else:
        path = Path(data_yaml)
        if not path.is_file():
            raise FileNotFoundError(f"data YAML not found: {path}")
        groups = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(groups, dict) or not groups:
        raise ConfigError("BAGEL data YAML: expected {group: {dataset_names, weight, ...}}")
    sources: dict[str, Any] = {}
    out: dict[str, Any] = {"sources": sources}
    for group, spec in groups.items():
        where = f"data_yaml.{group}"
        if group not in _SUPPORTED_GROUPS:
            raise ConfigError(f"{where}: group {group!r} has no unigendet sample type (supported: "
                              f"{', '.join(_SUPPORTED_GROUPS)})")
        if not isinstance(spec, dict) or not spec.get("dataset_names"):
            raise ConfigError(f"{where}.dataset_names is missing")
        names = list(spec["dataset_names"])
        weight = float(spec.get("weight", 1.0)) / len(names)
        mandatory = bool(spec.get("is_mandatory", False))
        if spec.get("num_used_data") is not None:
            logger.info("%s.num_used_data ignored: every record of every file is used", where)
        for name in names:
            entry = info.get(group, {}).get(name)
            if entry is None:
                raise ConfigError(f"{where}: dataset {name!r} is not in dataset_info[{group!r}]")
            build = _t2i_source if group == "t2i_pretrain" else _vlm_source
            sources[name] = build(name, entry, weight, mandatory)
        transform = _transform(spec.get("image_transform_args"), where)
        if transform:
            section = "vae_transform" if group == "t2i_pretrain" else "vit_transform"
            out[section] = {**_TRANSFORM_DEFAULTS[section], **transform}
    return out


def write_data_config(sections: dict[str, Any], path: str | Path) -> Path:
    """Write converted sections as a YAML file usable as (or merged into) a training config's ``data:``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": sections}, sort_keys=False))
    return path


@dataclass
class ConvertDataCommand:
    """``convert-data``: BAGEL's ``dataset_info`` + data YAML -> a YAML file with our ``data:`` section."""

    dataset_info: str  # BAGEL's dataset_info.py (or a JSON/YAML file with the same DATASET_INFO mapping)
    data_yaml: str  # BAGEL's data config (groups with dataset_names, weight, is_mandatory, image_transform_args)
    out: str  # the YAML file to write; pass it to `unigendet train --config` next to a recipe, or merge it in

    def check_inputs(self) -> None:
        for key in ("dataset_info", "data_yaml"):
            if not Path(getattr(self, key)).is_file():
                raise ConfigError(f"{key}: {getattr(self, key)} does not exist")


def run_convert_data_command(cfg: ConvertDataCommand) -> str:
    sections = convert_bagel_data_config(cfg.dataset_info, cfg.data_yaml)
    path = write_data_config(sections, cfg.out)
    return f"wrote {path}: {len(sections['sources'])} source(s) ({', '.join(sections['sources'])})"
