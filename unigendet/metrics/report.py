"""Evaluation reports: ``<name>.json`` (metrics + provenance), ``<name>.md`` (readable), ``<name>_roc.png``,
plus the plots and tables the detection jobs add (:func:`bar_chart_png`, :func:`curves_png`, :func:`markdown_table`).

``metrics`` is the dict of :func:`~unigendet.metrics.fakeclue.text_metrics` or
:func:`~unigendet.metrics.fakeclue.head_metrics`, or a dict of such dicts (e.g. ``{"text": ..., "head": ...}``),
each rendered as its own section (sections holding only nested dicts, such as per-setting metrics, are left to
the ``tables`` the job passes). JSON is strict: NaN/inf are written as ``null`` (shown "N/A" in markdown).
In markdown, rates (acc, F1, ROUGE-L, CSS, AUC, per-class acc) are printed ×100 as in the paper; the JSON keeps
fractions.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unigendet.labels import CLASS_NAMES

RATE_KEYS = ("acc", "f1_macro", "rouge_l", "css", "auc", "real_acc", "fake_acc", "acc_unparsed_as_wrong",
             "real_f1", "fake_f1", "overall_acc", "overall_f1", "balanced_acc", "mean_acc", "ap", "mean_auc",
             "mean_ap")
# Columns of merge_reports, in this order, when present in any report.
HEADLINE_KEYS = ("acc", "f1_macro", "rouge_l", "css", "auc", "n", "n_unparsed", "n_errors")
_SKIP_IN_TABLE = {"confusion", "notes", "samples", "unparsed_by_class"}


def jsonable(x: Any) -> Any:
    """Plain-JSON copy: NaN/inf -> None, numpy scalars/arrays -> Python, Path -> str, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy / torch scalars and arrays
        return jsonable(x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _is_metric_dict(d: Any) -> bool:
    return isinstance(d, dict) and any(k in d for k in ("acc", "f1_macro", "auc", "rouge_l"))


def _sections(metrics: dict) -> list[tuple[str | None, dict]]:
    """[(title, metric dict)]: one untitled section for a flat dict, one per sub-dict otherwise."""
    if _is_metric_dict(metrics):
        return [(None, metrics)]
    return [(str(k), v) for k, v in metrics.items() if isinstance(v, dict)]


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "N/A"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{100 * v:.2f}" if key.split(".")[-1] in RATE_KEYS else f"{v:.4g}"
    return str(v)


def _confusion_md(m: list[list[int]], unparsed: dict | None) -> list[str]:
    head = "| true \\ predicted | " + " | ".join(CLASS_NAMES) + (" | unparsed |" if unparsed is not None else " |")
    rows = [head, "|---" * (len(CLASS_NAMES) + 1 + (unparsed is not None)) + "|"]
    for k, name in enumerate(CLASS_NAMES):
        cells = [str(c) for c in m[k]] + ([str(unparsed.get(name, 0))] if unparsed is not None else [])
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _has_rows(d: dict) -> bool:
    return "confusion" in d or any(k not in _SKIP_IN_TABLE and not isinstance(v, (dict, list)) for k, v in d.items())


def _markdown(name: str, metrics: dict, config: dict, roc: Path | None, tables: Sequence[str] = (),
              figures: Mapping[str, Path] | None = None) -> str:
    lines = [f"# {name}", "", "Rates (acc, F1, ROUGE-L, CSS, AUC) ×100; counts as is. Labels: real / fake.", ""]
    for table in tables:
        lines += [table.rstrip("\n"), ""]
    for title, figure in (figures or {}).items():
        lines += [f"![{title}]({Path(figure).name})", ""]
    for title, d in _sections(metrics):
        if not _has_rows(d):  # nested-only sections (per setting, per generator) are shown by ``tables``
            continue
        if title:
            lines += [f"## {title}", ""]
        lines += ["| metric | value |", "|---|---|"]
        for k, v in d.items():
            if k in _SKIP_IN_TABLE or isinstance(v, (dict, list)):
                continue
            lines.append(f"| {k} | {_fmt(k, v)} |")
        lines.append("")
        if "confusion" in d:
            lines += ["Confusion matrix (rows: true class, columns: predicted class):", ""]
            lines += _confusion_md(d["confusion"], d.get("unparsed_by_class"))
            lines.append("")
        for note in d.get("notes", []):
            lines.append(f"- {note}")
        if d.get("notes"):
            lines.append("")
    if roc is not None:
        lines += [f"![ROC]({roc.name})", ""]
    if config:
        lines += ["## Config", "", "| key | value |", "|---|---|"]
        for k, v in _flatten(config).items():
            lines.append(f"| {k} | {json.dumps(jsonable(v))} |")
        lines.append("")
    return "\n".join(lines)


def _roc_png(path: Path, p_fake: Sequence[float], labels: Sequence[int], title: str) -> None:
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # Agg only, no pyplot / display
    )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = [int(y) for y in labels]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if len(set(labels)) == 2:
        from sklearn.metrics import roc_auc_score, roc_curve

        fpr, tpr, _ = roc_curve(labels, [float(p) for p in p_fake])  # positive class = 1 = fake
        ax.plot(fpr, tpr, label=f"AUC = {roc_auc_score(labels, [float(p) for p in p_fake]):.4f}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nsingle class present", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake called fake)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(out_dir: str | Path, name: str, metrics: dict, config: dict,
                 p_fake: Sequence[float] | None = None, labels: Sequence[int] | None = None, *,
                 tables: Sequence[str] = (), figures: Mapping[str, Path] | None = None,
                 headline: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and, with ``p_fake`` and ``labels`` (internal: 1 = fake),
    ``<name>_roc.png``.

    ``tables``: ready Markdown blocks shown first (e.g. :func:`markdown_table`); ``figures``: ``{title: PNG path}``
    already written next to the report, embedded in the Markdown; ``headline``: dotted metric keys that
    :func:`merge_reports` shows for this report by default (stored in the JSON).
    Returns ``{"json": path, "md": path}`` plus ``"roc": path`` when the PNG was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    roc = None
    if (p_fake is None) != (labels is None):
        raise ValueError("give both p_fake and labels, or neither")
    if p_fake is not None:
        if len(p_fake) != len(labels):
            raise ValueError(f"{len(p_fake)} scores but {len(labels)} labels")
        roc = out_dir / f"{name}_roc.png"
        _roc_png(roc, p_fake, labels, name)
    from unigendet import __version__

    doc = {
        "name": name,
        "metrics": jsonable(metrics),
        "config": jsonable(config),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "unigendet_version": __version__,
    }
    if headline is not None:
        doc["headline"] = list(headline)
    paths["json"] = out_dir / f"{name}.json"
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["md"] = out_dir / f"{name}.md"
    paths["md"].write_text(_markdown(name, metrics, config, roc, tables, figures), encoding="utf-8")
    if roc is not None:
        paths["roc"] = roc
    return paths


def merge_reports(paths: Sequence[str | Path], columns: Sequence[str] | None = None) -> str:
    """Markdown table comparing JSON reports, one row per run (its ``name``).

    Columns: ``columns`` if given (dotted keys into ``metrics``, e.g. ``"text.acc"``), else every headline metric
    (acc, F1, ROUGE-L, CSS, AUC, n, unparsed, errors) found in any report, per section; a report that declares
    its own ``headline`` keys (detection and robustness reports) contributes those instead, after the others.
    Missing values show "—".
    """
    runs = []
    for p in paths:
        doc = json.loads(Path(p).read_text(encoding="utf-8"))
        runs.append((doc.get("name", Path(p).stem), _flatten(doc.get("metrics", {})), doc.get("headline")))
    if columns is None:
        columns = _default_columns([flat for _, flat, headline in runs if headline is None])
        for _, _, headline in runs:
            columns += [k for k in headline or () if k not in columns]
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, flat, _ in runs:
        cells = [_fmt(c, flat[c]) if c in flat else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _default_columns(flats: Sequence[dict[str, Any]]) -> list[str]:
    """Every headline metric found, grouped by section, in HEADLINE_KEYS order within a section."""
    columns: list[str] = []
    for flat in flats:
        for key in flat:
            if key.split(".")[-1] in HEADLINE_KEYS and key not in columns:
                columns.append(key)
    order = {k: i for i, k in enumerate(HEADLINE_KEYS)}

    def prefix(k: str) -> str:
        return k.rsplit(".", 1)[0] if "." in k else ""

    sections = list(dict.fromkeys(prefix(k) for k in columns))
    columns.sort(key=lambda k: (sections.index(prefix(k)), order[k.split(".")[-1]]))
    return columns


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], keys: Sequence[str] | None = None,
                   title: str | None = None) -> str:
    """A Markdown table; cell values are formatted like report values, with ``keys[j]`` (default the header)
    deciding whether column ``j`` is a rate (×100)."""
    keys = list(keys) if keys is not None else list(header)
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [cell if isinstance(cell, str) else _fmt(key, cell) for key, cell in zip(keys, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots (Agg canvas, no pyplot: safe in headless and multi-threaded jobs)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def bar_chart_png(path: str | Path, values: Mapping[str, float], title: str, ylabel: str = "accuracy (%)",
                  mean: float | None = None, colors: Mapping[str, str] | None = None) -> Path:
    """Bars of rates (fractions, shown ×100) per name; NaN bars are left empty and labelled N/A; ``mean``
    (a fraction) is drawn as a dashed line; ``colors`` overrides the colour of some bars."""
    path = Path(path)
    names = list(values)
    heights = [100 * v if v is not None and math.isfinite(v) else 0.0 for v in values.values()]
    fig = _figure(max(5.5, 0.7 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), heights, color=[(colors or {}).get(n, "tab:blue") for n in names])
    for bar, v in zip(bars, values.values()):
        label = "N/A" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, label, ha="center", fontsize=8)
    if mean is not None and math.isfinite(mean):
        ax.axhline(100 * mean, linestyle="--", color="grey", linewidth=1, label=f"mean {100 * mean:.1f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def curves_png(path: str | Path, panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
               title: str, ylabel: str = "metric (%)") -> Path:
    """One subplot per panel (x-axis label = panel name), one line per series of (x, rate) points; rates
    are fractions shown ×100, NaN points are dropped."""
    path = Path(path)
    fig = _figure(4.5 * max(1, len(panels)), 4.0)
    for k, (xlabel, series) in enumerate(panels.items(), 1):
        ax = fig.add_subplot(1, max(1, len(panels)), k)
        for label, points in series.items():
            pts = [(x, 100 * y) for x, y in points if y is not None and math.isfinite(y)]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, linewidth=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
