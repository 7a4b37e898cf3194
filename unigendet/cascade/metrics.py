"""The cascade's metrics, computed from the evaluation harness's stored output lines (each with the image's
internal ``label``, 1 = fake, its ``p_fake`` = final score, and the cascade's ``details``), so they can be
recomputed from a finished or resumed job.

* Decision metrics, fake = positive, with ESCALATE counted as "fake" (``conservative``: a person looks at it, so
  nothing escalated slips through) or left out (``abstain``): Acc, FNR = FN / (FN + TP), FPR = FP / (FP + TN).
* Escalation rate; the share of images reaching each stage and exiting at each stage.
* Latency per stage (milliseconds per image, over the images that ran the stage): mean and 95th percentile
  (linear interpolation between order statistics, numpy's default).
* AUC and AP of the final score over every image; each stage's AUC of its own score over the images that reached
  it (NaN, with the reason, when only one class reached it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unigendet.cascade.result import STAGES, Decision
from unigendet.labels import LABEL_FAKE
from unigendet.metrics.detection import ranking_metrics

MODES = ("conservative", "abstain")
_STAGE_SCORE = {"binary": "binary_score", "spectral": "spectral_score", "mllm": "mllm_confidence"}


def cascade_lines(outputs: Sequence[dict]) -> list[dict]:
    """The scored lines that carry cascade details."""
    return [o for o in outputs if o.get("error") is None and isinstance(o.get("details"), dict)
            and "decision" in o["details"]]


def decision_metrics(labels: Sequence[int], decisions: Sequence[str], mode: str) -> dict[str, Any]:
    """Acc / FNR / FPR of the decisions (BLOCK = fake, PASS = real, ESCALATE by ``mode``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    tp = fn = fp = tn = excluded = 0
    for label, decision in zip(labels, decisions):
        if decision == Decision.ESCALATE.value and mode == "abstain":
            excluded += 1
            continue
        called_fake = decision in (Decision.BLOCK.value, Decision.ESCALATE.value)
        if label == LABEL_FAKE:
            tp, fn = tp + called_fake, fn + (not called_fake)
        else:
            fp, tn = fp + called_fake, tn + (not called_fake)
    n = tp + fn + fp + tn
    return {"acc": (tp + tn) / n if n else math.nan, "fnr": fn / (fn + tp) if fn + tp else math.nan,
            "fpr": fp / (fp + tn) if fp + tn else math.nan, "n": n, "n_excluded": excluded,
            "tp": tp, "fn": fn, "fp": fp, "tn": tn}


def latency_summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"mean": math.nan, "p95": math.nan, "n": 0}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "p95": float(np.percentile(array, 95)), "n": len(values)}


def stage_auc(labels: Sequence[int], scores: Sequence[float | None]) -> dict[str, Any]:
    """AUC of a stage's score on the images that reached it and have that score."""
    pairs = [(y, s) for y, s in zip(labels, scores) if s is not None and math.isfinite(s)]
    n_fake = sum(y == LABEL_FAKE for y, _ in pairs)
    out = {"n": len(pairs), "n_fake": n_fake, "n_real": len(pairs) - n_fake, "auc": math.nan, "reason": None}
    if not pairs:
        out["reason"] = "no image reached this stage"
    elif n_fake in (0, len(pairs)):
        out["reason"] = f"one class only ({'fake' if n_fake else 'real'} images) reached this stage"
    else:
        out["auc"] = ranking_metrics([y for y, _ in pairs], [s for _, s in pairs])["auc"]
    return out


def cascade_metrics(outputs: Sequence[dict]) -> dict[str, Any]:
    """Every cascade metric of a scored job (see the module docstring); ``n`` counts the lines with details."""
    lines = cascade_lines(outputs)
    n = len(lines)
    labels = [int(o["label"]) for o in lines]
    details = [o["details"] for o in lines]
    decisions = [d["decision"] for d in details]
    exited = [d["stage_exited"] for d in details]
    reached = {stage: [STAGES.index(e) >= STAGES.index(stage) for e in exited] for stage in STAGES}
    final = [o["p_fake"] for o in lines]
    finite = [(y, p) for y, p in zip(labels, final) if p is not None and math.isfinite(p)]
    ranking = ranking_metrics([y for y, _ in finite], [p for _, p in finite], with_ap=True)
    return {
        "n": n,
        "decisions": {mode: decision_metrics(labels, decisions, mode) for mode in MODES},
        "escalation_rate": decisions.count(Decision.ESCALATE.value) / n if n else math.nan,
        "decision_counts": {d.value: decisions.count(d.value) for d in Decision},
        "reach": {stage: sum(mask) / n if n else math.nan for stage, mask in reached.items()},
        "exits": {stage: exited.count(stage) / n if n else math.nan for stage in STAGES},
        "latency_ms": {stage: latency_summary([d["latency_ms"][stage] for d in details
                                               if stage in (d.get("latency_ms") or {})]) for stage in STAGES},
        "final_score": {"auc": ranking["auc"], "ap": ranking["ap"], "n": len(finite)},
        "stage_auc": {stage: stage_auc([y for y, r in zip(labels, reached[stage]) if r],
                                       [d[_STAGE_SCORE[stage]] for d, r in zip(details, reached[stage]) if r])
                      for stage in STAGES},
    }


def _pct(value: float) -> str:
    return "N/A" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _ms(summary: dict) -> str:
    return "—" if not summary["n"] else f"{summary['mean']:.2f} / {summary['p95']:.2f}"


CASCADE_TABLE_HEADER = ("detector", "Acc (cons.)", "FNR (cons.)", "FPR (cons.)", "Acc (abst.)", "FNR (abst.)",
                        "FPR (abst.)", "escalated", "reach spectral", "reach mllm", "AUC final", "AP final",
                        "AUC binary", "AUC spectral", "AUC mllm", "ms binary", "ms spectral", "ms mllm", "n")


def cascade_table(rows: dict[str, dict[str, Any]], title: str) -> str:
    """A Markdown table of cascade metrics per detector (rates x100; latency mean / p95 in ms per image) and what
    its columns mean, including why a stage AUC is missing."""
    lines = [f"### {title}", "", "| " + " | ".join(CASCADE_TABLE_HEADER) + " |", "|---" * len(CASCADE_TABLE_HEADER)
             + "|"]
    notes = []
    for name, m in rows.items():
        cons, abst = m["decisions"]["conservative"], m["decisions"]["abstain"]
        cells = [name, _pct(cons["acc"]), _pct(cons["fnr"]), _pct(cons["fpr"]), _pct(abst["acc"]), _pct(abst["fnr"]),
                 _pct(abst["fpr"]), _pct(m["escalation_rate"]), _pct(m["reach"]["spectral"]), _pct(m["reach"]["mllm"]),
                 _pct(m["final_score"]["auc"]), _pct(m["final_score"]["ap"]),
                 *(_pct(m["stage_auc"][s]["auc"]) for s in STAGES), *(_ms(m["latency_ms"][s]) for s in STAGES),
                 str(m["n"])]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {name}, AUC {stage}: N/A, {m['stage_auc'][stage]['reason']}" for stage in STAGES
                  if m["stage_auc"][stage]["reason"]]
    lines += ["", "- Decisions with fake as positive: BLOCK = fake, PASS = real; ESCALATE counted as fake (cons.) or "
              "left out (abst.). escalated / reach: shares of all images.",
              "- AUC / AP final: the final score (deepest stage's score) over every image; AUC per stage: that "
              "stage's score over the images that reached it. ms: mean / p95 per image over the images that ran "
              "the stage.", *notes]
    return "\n".join(lines) + "\n"
