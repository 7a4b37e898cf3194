"""Messages for state-dict mismatches, shared by every strict loader."""

from __future__ import annotations

from collections.abc import Sequence


def format_key_problems(missing: Sequence[str] = (), unexpected: Sequence[str] = (), other: Sequence[str] = (),
                        limit: int = 20) -> str:
    """``missing keys (n): a, b, ...; unexpected keys (m): ...; <other>`` with long lists cut at ``limit``."""

    def fmt(items: Sequence[str]) -> str:
        items = list(items)
        shown = ", ".join(items[:limit])
        return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    if other:
        parts.append(fmt(other))
    return "; ".join(parts)
