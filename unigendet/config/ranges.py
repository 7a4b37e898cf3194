"""Numeric range checks for config fields, used by the sections' ``validate`` methods.

Every check rejects NaN and infinities first: YAML ``.nan`` reads as a float NaN and every comparison with
NaN is False, so a plain ``value <= 0`` test would let it through. Messages name the field (the config
loader prefixes the section's dotted path) and the value.
"""

from __future__ import annotations

import math

from unigendet.config.loader import ConfigError


def require_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"{'<' if high_open else '<='} {high}"


def require_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is finite and within the bounds (closed unless ``low_open`` / ``high_open``)."""
    require_finite(name, value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{name} must be {_describe(low, high, low_open, high_open)}, got {value!r}")


def require_positive(name: str, value: float) -> None:
    require_range(name, value, 0, low_open=True)


def require_non_negative(name: str, value: float) -> None:
    require_range(name, value, 0)


def require_probability(name: str, value: float, *, one_allowed: bool = True) -> None:
    """A fraction in [0, 1] (or [0, 1) when ``one_allowed`` is False)."""
    require_range(name, value, 0, 1, high_open=not one_allowed)
