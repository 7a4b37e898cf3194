"""Evaluation reports: ``<name>.json`` (metrics + provenance), ``<name>.md`` (readable), ``<name>_roc.png``.

``metrics`` is the dict of :func:`~unigendet.metrics.fakeclue.text_metrics` or
:func:`~unigendet.metrics.fakeclue.head_metrics`, or a dict of such dicts (e.g. ``{"text": ..., "head": ...}``),
each rendered as its own section. JSON is strict: NaN/inf are written as ``null`` (shown "N/A" in markdown).
In markdown, rates (acc, F1, ROUGE-L, CSS, AUC, per-class acc) are printed ×100 as in the paper; the JSON keeps
fractions.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unigendet.metrics.fakeclue import CLASS_NAMES

RATE_KEYS = ("acc", "f1_macro", "rouge_l", "css", "auc", "real_acc", "fake_acc", "acc_unparsed_as_wrong")
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


def _markdown(name: str, metrics: dict, config: dict, roc: Path | None) -> str:
    lines = [f"# {name}", "", "Rates (acc, F1, ROUGE-L, CSS, AUC) ×100; counts as is. Labels: real / fake.", ""]
    for title, d in _sections(metrics):
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
                 p_fake: Sequence[float] | None = None, labels: Sequence[int] | None = None) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and, with ``p_fake`` and ``labels`` (internal: 1 = fake), ``<name>_roc.png``.

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
    paths["json"] = out_dir / f"{name}.json"
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["md"] = out_dir / f"{name}.md"
    paths["md"].write_text(_markdown(name, metrics, config, roc), encoding="utf-8")
    if roc is not None:
        paths["roc"] = roc
    return paths


def merge_reports(paths: Sequence[str | Path], columns: Sequence[str] | None = None) -> str:
    """Markdown table comparing JSON reports, one row per run (its ``name``).

    Columns: ``columns`` if given (dotted keys into ``metrics``, e.g. ``"text.acc"``), else every headline metric
    (acc, F1, ROUGE-L, CSS, AUC, n, unparsed, errors) found in any report, per section. Missing values show "—".
    """
    runs = []
    for p in paths:
        doc = json.loads(Path(p).read_text(encoding="utf-8"))
        runs.append((doc.get("name", Path(p).stem), _flatten(doc.get("metrics", {}))))
    if columns is None:
        columns = []
        for _, flat in runs:
            for key in flat:
                if key.split(".")[-1] in HEADLINE_KEYS and key not in columns:
                    columns.append(key)
        order = {k: i for i, k in enumerate(HEADLINE_KEYS)}
        prefix = lambda k: k.rsplit(".", 1)[0] if "." in k else ""
        sections = list(dict.fromkeys(prefix(k) for k in columns))
        columns.sort(key=lambda k: (sections.index(prefix(k)), order[k.split(".")[-1]]))
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, flat in runs:
        cells = [_fmt(c, flat[c]) if c in flat else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
