"""Typed configuration: dataclasses built from YAML/dicts with validation and dotted overrides.

Every option has one spelling. Unknown keys, wrong types and invalid choices raise ``ConfigError``
naming the full dotted path of the offending key, so a broken recipe fails at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-4``) as floats: YAML 1.1
    would read them as strings, and learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the dotted key."""


class MissingKeyError(ConfigError):
    """Required keys (no default) were not given; ``keys`` holds their dotted names. Raised only when every
    given key was valid, so a caller may still show the configuration with these keys empty."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)
        super().__init__(f"missing required key(s): {', '.join(self.keys)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _raise_union_error(value: Any, tp: Any, path: str, errors: list[tuple[Any, ConfigError]]) -> None:
    """No option of a union accepted ``value``. For a choice between sections (dataclasses), say why each
    refused it; an option that lacked only required keys is the one the value was meant for."""
    sections = [(option, err) for option, err in errors if dataclasses.is_dataclass(option)]
    if not sections or not isinstance(value, dict):
        raise ConfigError(f"{path}: {value!r} matches none of {_type_name(tp)}")
    for _, err in sections:
        if isinstance(err, MissingKeyError):
            raise err
    reasons = "; ".join(f"as {option.__name__}: {err}" for option, err in sections)
    raise ConfigError(f"{path}: fits none of {_type_name(tp)} ({reasons})")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: list[tuple[Any, ConfigError]] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append((option, err))
        _raise_union_error(value, tp, path, errors)
    if origin is Literal:
        choices = get_args(tp)
        # Compare types too: True == 1 must not satisfy Literal[1].
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _prefix=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], _prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError.

    After construction the dataclass's own ``validate()`` (if any) runs, so cross-field rules
    are checked in one place.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{_prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{_prefix}." if _prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    missing: list[str] = []
    for name, spec in fields.items():
        path = f"{_prefix}.{name}" if _prefix else name
        if name not in data and not _is_required(spec):
            continue
        if name not in data and _section_type(hints[name]) is None:
            missing.append(path)
            continue
        try:
            # An absent required section is built from nothing, so its own required keys get named.
            kwargs[name] = _convert(data.get(name, {}), hints[name], path)
        except MissingKeyError as err:
            missing += err.keys
    if missing:
        raise MissingKeyError(missing)
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{_prefix or cls.__name__}: {err}") from err
    except ConfigError:
        raise
    except ValueError as err:  # checks in __post_init__
        raise ConfigError(_prefixed(str(err), _prefix, fields)) from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            try:
                validate()
            except ConfigError:
                raise
            except ValueError as err:
                raise ConfigError(str(err)) from err
        except ConfigError as err:
            if _prefix and not str(err).startswith(_prefix):
                raise ConfigError(f"{_prefix}.{err}") from err
            raise
    return obj


def _is_required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _section_type(tp: Any) -> type | None:
    """The (first) dataclass a field of type ``tp`` holds, if any (``A``, ``A | None``, ``A | B``)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (typing.Union, types.UnionType):
        return next((option for option in get_args(tp) if dataclasses.is_dataclass(option)), None)
    return None


def _prefixed(message: str, prefix: str, fields: dict[str, dataclasses.Field]) -> str:
    """``prefix.field must ...`` when the message starts with a field's name, else ``prefix: message``."""
    if not prefix or message.startswith(prefix):
        return message
    first = re.split(r"[^A-Za-z0-9_]", message, maxsplit=1)[0]
    return f"{prefix}.{message}" if first in fields else f"{prefix}: {message}"


def to_dict(obj: Any) -> Any:
    """Plain-data (JSON/YAML-serialisable) view of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML scalars/lists (``1e-4``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(data, key, yaml.load(raw, Loader=_Loader) if raw.strip() else "")
    return data


BASE_KEY = "_base_"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in ``override`` replaces the base value, except
    that ``key: null`` over an inherited *mapping* removes it (e.g. drop a data source of the base)."""
    out = dict(base)
    for key, value in override.items():
        if value is None and isinstance(out.get(key), dict):
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_bases(node: Any, here: Path, seen: tuple[Path, ...]) -> Any:
    """Replace every ``_base_: file.yaml`` (at any mapping level, path relative to the file that
    names it) by that file's content merged under the mapping's own keys."""
    if not isinstance(node, dict):
        return node
    node = {k: _resolve_bases(v, here, seen) for k, v in node.items()}
    base_ref = node.pop(BASE_KEY, None)
    if base_ref is None:
        return node
    refs = base_ref if isinstance(base_ref, list) else [base_ref]
    merged: dict[str, Any] = {}
    for ref in refs:
        merged = deep_merge(merged, load_yaml(here.parent / ref, _seen=seen))
    return deep_merge(merged, node)


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``_base_`` includes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: circular {BASE_KEY} include")
    with path.open() as fh:
        try:
            data = yaml.load(fh, Loader=_Loader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return _resolve_bases(data, path, _seen + (resolved,))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from an optional YAML file plus dotted overrides, validated."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    path = Path(path)
    text = to_dict(obj)
    if path.suffix == ".json":
        path.write_text(json.dumps(text, indent=2, sort_keys=False))
    else:
        path.write_text(yaml.safe_dump(text, sort_keys=False))


def to_yaml(obj: Any) -> str:
    """The YAML text of a config dataclass (every key, in field order), as ``load_config`` reads it back."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def config_template(cls: type) -> dict[str, Any]:
    """Every key of dataclass ``cls`` with its default value; keys without a default are None, and sections
    without a default are filled in recursively (the first section type of a union)."""
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        if not spec.init:
            continue
        if spec.default is not dataclasses.MISSING:
            out[spec.name] = to_dict(spec.default)
        elif spec.default_factory is not dataclasses.MISSING:
            out[spec.name] = to_dict(spec.default_factory())
        else:
            section = _section_type(hints[spec.name])
            out[spec.name] = None if section is None else config_template(section)
    return out


def key_type(cls: type, dotted: str) -> Any:
    """The annotated type of the dotted key ``dotted`` of dataclass ``cls``. In a union of sections, the first
    section that has the key decides. An unknown key raises ConfigError naming it."""
    tp: Any = cls
    for depth, name in enumerate(dotted.split(".")):
        sections = [tp] if dataclasses.is_dataclass(tp) else [
            option for option in get_args(tp) if dataclasses.is_dataclass(option)]
        owner = next((s for s in sections if name in {f.name for f in dataclasses.fields(s)}), None)
        if owner is None:
            raise ConfigError(f"unknown key {'.'.join(dotted.split('.')[:depth + 1])}")
        tp = get_type_hints(owner)[name]
    return tp


def _admits_text(tp: Any) -> bool:
    if tp is str or tp is Any:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(choice, str) for choice in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return any(_admits_text(option) for option in get_args(tp) if option is not type(None))
    return False


def parse_text(text: str | list[str], tp: Any) -> Any:
    """A command-line word (or words, for a list) as a value of type ``tp``: kept as typed where ``tp`` takes
    text (paths, prompts, names, choices), read as a YAML scalar otherwise (numbers, booleans, null)."""
    if isinstance(text, list):
        sequence = next((option for option in [tp, *get_args(tp)] if get_origin(option) in (list, tuple)), None)
        args = get_args(sequence) if sequence is not None else ()
        fixed = get_origin(sequence) is tuple and args and args[-1] is not Ellipsis
        item_types = [args[i] if fixed and i < len(args) else (args[0] if args else Any) for i in range(len(text))]
        return [parse_text(word, item_tp) for word, item_tp in zip(text, item_types)]
    if _admits_text(tp):
        return text
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``key.sub`` in a nested mapping to an already typed ``value``, creating sections on the way."""
    _set_dotted(data, dotted, value)
