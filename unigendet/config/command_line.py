"""Commands as (config dataclass, run function), read from the command line through the config loader.

A :class:`Command`'s settings come from ``--config FILE`` (YAML, ``_base_`` includes), then its short flags
(:class:`Flag`: each an alias of one or more dotted config keys), then ``key=value`` words, and are validated as
one config by :func:`~unigendet.config.loader.from_dict`. Every default lives in the config dataclasses; the
flags only name keys.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import yaml

from unigendet.config.loader import (
    ConfigError,
    MissingKeyError,
    apply_overrides,
    config_template,
    deep_merge,
    from_dict,
    key_type,
    load_yaml,
    parse_text,
    set_key,
    to_yaml,
)

WORDS = object()  # Flag.value of a flag that takes words (not a switch)
SETTINGS_HELP = ("Settings come from --config FILE (YAML, _base_ includes), then the short flags (aliases of config "
                 "keys), then key=value words: any key can be set as key=value with its dotted name (e.g. "
                 "model.dtype=bf16). --print-config prints every key with its default; --dry-run validates the "
                 "settings and checks the inputs without loading a model.")


@dataclass(frozen=True)
class Flag:
    """``--name WORD...`` sets the config ``keys`` to the words (typed by each key); a switch (``value`` given)
    sets them to ``value``; ``expand`` turns the words (``value`` for a switch) into ``{dotted key: value}``."""

    name: str
    keys: tuple[str, ...] = ()
    help: str = ""
    nargs: int | str | None = None
    value: Any = WORDS
    expand: Callable[[Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Command:
    """One command: ``config`` and ``run`` are ``"module:name"``, imported only when the command runs (so
    ``--help`` stays fast); ``positional`` is the key the bare words fill; ``preset`` is set before the file;
    ``needs_file``: running (not ``--print-config``) needs ``--config FILE``."""

    name: str
    config: str
    run: str
    help: str
    flags: tuple[Flag, ...] = ()
    positional: str | None = None
    preset: tuple[tuple[str, Any], ...] = ()
    needs_file: bool = False


def opt(name: str, *keys: str, help: str = "", nargs: int | str | None = None) -> Flag:
    """A flag that takes words: ``--name WORD`` (``nargs``: a list)."""
    return Flag(name, keys, help, nargs)


def switch(name: str, key: str, value: Any = True, help: str = "") -> Flag:
    """A flag without words that sets ``key`` to ``value``."""
    return Flag(name, (key,), help, value=value)


def resolve(spec: str) -> Any:
    """The object named by ``"module:name"``."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _lookup(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _flag_help(flag: Flag, template: dict[str, Any]) -> str:
    if not flag.keys:
        return flag.help
    sets = ", ".join(flag.keys) + ("" if flag.value is WORDS else f" = {json.dumps(flag.value)}")
    default = _lookup(template, flag.keys[0]) if flag.value is WORDS else None
    shown = f"sets {sets}" + ("" if default is None else f" (default {default})")
    return f"{flag.help}; {shown}" if flag.help else shown


def build_parser(command: Command, cls: type) -> argparse.ArgumentParser:
    """The command's parser: the key=value (and positional) words, the general options and the short flags,
    each flag's help naming the keys it sets and their default."""
    words = f"{command.positional.upper()} ... | key=value" if command.positional else "key=value"
    parser = argparse.ArgumentParser(
        prog=f"unigendet {command.name}", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{command.help}\n\n" + textwrap.fill(SETTINGS_HELP, 100))
    parser.add_argument("words", nargs="*", metavar=words)
    general = parser.add_argument_group("configuration")
    general.add_argument("--config", metavar="FILE", help="YAML config file (_base_ includes allowed)")
    general.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    general.add_argument("--dry-run", action="store_true", help="validate and check inputs; load and run nothing")
    general.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    general.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    aliases = parser.add_argument_group("short flags (aliases of config keys)")
    template = config_template(cls)
    for i, flag in enumerate(command.flags):
        metavar = (flag.keys[0].rsplit(".", 1)[-1] if flag.keys else flag.name.lstrip("-")).upper()
        kwargs = ({"nargs": flag.nargs, "metavar": metavar} if flag.value is WORDS
                  else {"action": "store_const", "const": flag.value})
        aliases.add_argument(flag.name, dest=f"flag{i}", default=argparse.SUPPRESS, help=_flag_help(flag, template),
                             **kwargs)
    return parser


def _split_words(words: list[str], cls: type, positional: str | None) -> tuple[list[str], list[str]]:
    """(key=value overrides, positional words). Where positional words are allowed, only a word whose key
    starts with a key of the config is an override, so a prompt such as "E=mc2 on a blackboard" stays a prompt."""
    sections = {f.name for f in fields(cls)}
    overrides, items = [], []
    for word in words:
        key = re.match(r"([A-Za-z_][\w.\[\]]*)=", word)
        if key and (positional is None or key.group(1).split(".")[0] in sections):
            overrides.append(word)
        elif positional is not None:
            items.append(word)
        else:
            raise ConfigError(f"unexpected argument {word!r}: settings are key=value (or --config FILE)")
    return overrides, items


def _without_overrides(values: list[str], cls: type) -> tuple[list[str], list[str]]:
    """(values, key=value words whose key starts with a section of ``cls``) of a list flag's words."""
    sections = {f.name for f in fields(cls)}
    kept, overrides = [], []
    for word in values:
        key = re.match(r"([A-Za-z_][\w.\[\]]*)=", word)
        (overrides if key and key.group(1).split(".")[0] in sections else kept).append(word)
    return kept, overrides


def _typed(value: Any, cls: type, key: str) -> Any:
    is_text = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return parse_text(value, key_type(cls, key)) if is_text else value


def config_data(command: Command, cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The settings as one mapping: the command's preset, the file, the short flags, then the key=value words."""
    if command.needs_file and not ns.config and not ns.print_config:
        raise ConfigError(f"{command.name} needs --config FILE")
    data: dict[str, Any] = {}
    for key, value in command.preset:
        set_key(data, key, value)
    if ns.config:
        data = deep_merge(data, load_yaml(ns.config))
    words = list(ns.words)
    for i, flag in enumerate(command.flags):
        if hasattr(ns, f"flag{i}"):
            given = getattr(ns, f"flag{i}")
            if isinstance(given, list):  # a list flag swallows the words after it: hand back the key=value ones
                given, trailing = _without_overrides(given, cls)
                words += trailing
            values = flag.expand(given) if flag.expand else {key: given for key in flag.keys}
            for key, value in values.items():
                set_key(data, key, _typed(value, cls, key))
    overrides, items = _split_words(words, cls, command.positional)
    if items:
        set_key(data, command.positional, items)
    return apply_overrides(data, overrides)


def missing_keys_error(command: Command, err: MissingKeyError) -> ConfigError:
    """``err`` with each missing key's short flag, where it has one."""
    flags = {key: flag.name for flag in command.flags for key in flag.keys}
    flags[command.positional] = f"the {command.positional} as bare words"
    named = [f"{key} ({flags[key]})" if key in flags else key for key in err.keys]
    return ConfigError(f"missing required key(s): {', '.join(named)}")


def parse_command_line(command: Command, argv: list[str]) -> argparse.Namespace:
    return build_parser(command, resolve(command.config)).parse_intermixed_args(argv)


def prepare(command: Command, ns: argparse.Namespace) -> Any | None:
    """The validated config whose inputs exist, ready to run; None when ``--print-config`` or ``--dry-run``
    has done the command's work (printed the config, or the one-line summary) instead."""
    cls = resolve(command.config)
    data = config_data(command, cls, ns)
    try:
        cfg = from_dict(cls, data)
    except MissingKeyError as err:
        if not ns.print_config:
            raise missing_keys_error(command, err) from err
        # Show every key anyway: the ones still to set are empty.
        sys.stdout.write(yaml.safe_dump(deep_merge(config_template(cls), data), sort_keys=False))
        sys.stderr.write(f"unigendet: note: {missing_keys_error(command, err)}\n")
        return None
    if ns.print_config:
        sys.stdout.write(to_yaml(cfg))
        return None
    check_inputs = getattr(cfg, "check_inputs", None)
    if check_inputs is not None:
        check_inputs()
    if ns.dry_run:
        found = ", inputs found" if check_inputs is not None else ""
        sys.stdout.write(f"unigendet {command.name}: config valid{found} (dry run: nothing loaded or run)\n")
        return None
    return cfg
