"""Cross-dataset detection metrics: DMimage (the six numbers of the UniGenDet / FakeVLM tables) and
ARForensics (per-generator accuracy and its mean), from predicted internal labels (``0 = real, 1 = fake``) and,
optionally, the head's p(fake) for AUC / AP.

A prediction is an internal label or None (unparsed text, or no score); it comes from the detection head
(:func:`head_predictions`) or from the verdict parsed from the explanation. All rates are fractions; NaN when
undefined (no image of the class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from unigendet.labels import LABEL_FAKE, LABEL_REAL
from unigendet.metrics.fakeclue import confusion_2x2

UNPARSED_POLICIES = ("exclude", "wrong")
SIX_KEYS = ("real_acc", "real_f1", "fake_acc", "fake_f1", "overall_acc", "overall_f1")


def head_predictions(p_fake: Sequence[float], threshold: float = 0.5) -> list[int | None]:
    """Internal labels from p(fake): fake when ``p >= threshold``; None for a NaN (no score)."""
    return [None if not math.isfinite(float(p)) else int(float(p) >= threshold) for p in p_fake]


def _check(labels: Sequence[int], preds: Sequence[int | None], groups: Sequence[str] | None) -> None:
    if len(preds) != len(labels) or (groups is not None and len(groups) != len(labels)):
        raise ValueError(f"{len(labels)} labels, {len(preds)} predictions"
                         + ("" if groups is None else f", {len(groups)} groups") + ": lengths must match")
    bad = {y for y in labels if y not in (LABEL_REAL, LABEL_FAKE)}
    bad |= {p for p in preds if p is not None and p not in (LABEL_REAL, LABEL_FAKE)}
    if bad:
        raise ValueError(f"labels and predictions must be internal (0 = real, 1 = fake) or None, got {sorted(bad)}")


def resolve_unparsed(labels: Sequence[int], preds: Sequence[int | None], unparsed: str = "exclude"
                     ) -> tuple[list[int], list[int], list[bool]]:
    """(labels kept, predictions kept, mask of kept positions) under the ``unparsed`` policy: ``"exclude"``
    (project default, the FakeClue rule) leaves unparsed predictions out of every rate; ``"wrong"`` counts
    them as the other class."""
    if unparsed not in UNPARSED_POLICIES:
        raise ValueError(f"unparsed must be one of {UNPARSED_POLICIES}, got {unparsed!r}")
    kept_y, kept_p, mask = [], [], []
    for y, p in zip(labels, preds):
        if p is None and unparsed == "exclude":
            mask.append(False)
            continue
        kept_y.append(int(y))
        kept_p.append(1 - int(y) if p is None else int(p))
        mask.append(True)
    return kept_y, kept_p, mask


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _f1_from_acc(acc: float) -> float:
    """F1 of a class on a subset holding only that class: precision 1, recall = acc."""
    return 2 * acc / (1 + acc) if math.isfinite(acc) else math.nan


def binary_summary(labels: Sequence[int], preds: Sequence[int]) -> dict:
    """The six DMimage numbers, macro F1, balanced accuracy, counts and the confusion matrix
    (rows true real/fake, columns predicted real/fake) of fully parsed predictions.

    The six numbers, as inferred from the values UniGenDet and FakeVLM report: Real Acc (fraction of real images
    called real) and Fake Acc likewise; Real F1 / Fake F1 = the class's F1 on its own subset, where precision
    is 1, so 2·Acc/(1+Acc); Overall Acc; Overall F1 = binary F1 with **real as the positive class**.
    ``f1_macro`` (sklearn's ``average="macro"`` over the classes present) and ``balanced_acc`` (mean recall of
    the classes present, the original DMimage metric) are added for reference.
    """
    m = confusion_2x2(labels, preds)
    n = len(labels)
    rows = [sum(m[0]), sum(m[1])]
    cols = [m[0][0] + m[1][0], m[0][1] + m[1][1]]
    real_acc, fake_acc = _ratio(m[0][0], rows[0]), _ratio(m[1][1], rows[1])
    # Per-class F1 over the classes present in labels or predictions (sklearn's average="macro").
    per_class_f1 = [2 * m[c][c] / (rows[c] + cols[c]) for c in (0, 1) if rows[c] + cols[c]]
    recalls = [m[c][c] / rows[c] for c in (0, 1) if rows[c]]
    tp, fn, fp = m[0][0], m[0][1], m[1][0]  # real is the positive class of Overall F1
    return {
        "real_acc": real_acc,
        "real_f1": _f1_from_acc(real_acc),
        "fake_acc": fake_acc,
        "fake_f1": _f1_from_acc(fake_acc),
        "overall_acc": _ratio(m[0][0] + m[1][1], n),
        "overall_f1": (2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0) if n else math.nan,
        "f1_macro": sum(per_class_f1) / len(per_class_f1) if per_class_f1 else math.nan,
        "balanced_acc": sum(recalls) / len(recalls) if recalls else math.nan,
        "n": n,
        "n_real": rows[0],
        "n_fake": rows[1],
        "n_correct": m[0][0] + m[1][1],
        "confusion": m,
    }


def ranking_metrics(labels: Sequence[int], scores: Sequence[float], with_ap: bool = False) -> dict:
    """AUC (and AP) of p(fake) with fake as the positive class; NaN when a class is missing."""
    if len(set(labels)) < 2:
        return {"auc": math.nan, **({"ap": math.nan} if with_ap else {})}
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = {"auc": float(roc_auc_score(labels, scores))}
    if with_ap:
        out["ap"] = float(average_precision_score(labels, scores))
    return out


def _mean_defined(values: Sequence[float]) -> float:
    defined = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _scored(scores: Sequence[float] | None, mask: Sequence[bool]) -> list[float] | None:
    return None if scores is None else [float(s) for s, keep in zip(scores, mask) if keep]


def _policy_note(unparsed: str) -> str:
    return ("unparsed predictions excluded from every rate (counted in n_unparsed)" if unparsed == "exclude"
            else "unparsed predictions counted as wrong")


# --------------------------------------------------------------------------------------------------
# DMimage


def dmimage_metrics(labels: Sequence[int], preds: Sequence[int | None], groups: Sequence[str],
                    unparsed: str = "exclude", scores: Sequence[float] | None = None) -> dict:
    """DMimage numbers overall, per generator (its fakes against all reals) and per real source.

    ``groups[i]`` is the source folder of image ``i``: folders with fake images are generators, folders
    with only real images are real sources. As in the original DMimage protocol, each generator is scored on
    all real images plus its own fakes (so Real Acc is shared); ``mean_over_generators`` averages each number
    over the generators where it is defined."""
    _check(labels, preds, groups)
    y, p, mask = resolve_unparsed(labels, preds, unparsed)
    g = [grp for grp, keep in zip(groups, mask) if keep]
    s = _scored(scores, mask)
    out = binary_summary(y, p)
    if s is not None:
        out.update(ranking_metrics(y, s))
    out["n_unparsed"] = sum(q is None for q in preds)
    out["unparsed_policy"] = unparsed

    generators = list(dict.fromkeys(grp for grp, lab in zip(groups, labels) if lab == LABEL_FAKE))
    real_sources = [grp for grp in dict.fromkeys(groups) if grp not in generators]
    unparsed_in = {grp: 0 for grp in dict.fromkeys(groups)}
    for grp, pred in zip(groups, preds):
        unparsed_in[grp] += pred is None
    real_pos = [i for i, lab in enumerate(y) if lab == LABEL_REAL and g[i] in real_sources]

    per_generator = {}
    for gen in generators:
        idx = real_pos + [i for i in range(len(y)) if g[i] == gen]
        summary = binary_summary([y[i] for i in idx], [p[i] for i in idx])
        if s is not None:
            summary.update(ranking_metrics([y[i] for i in idx], [s[i] for i in idx]))
        summary["n_unparsed"] = unparsed_in[gen]
        per_generator[gen] = summary
    per_real_source = {}
    for src in real_sources:
        idx = [i for i in range(len(y)) if g[i] == src]
        acc = _ratio(sum(p[i] == LABEL_REAL for i in idx), len(idx))
        per_real_source[src] = {"real_acc": acc, "real_f1": _f1_from_acc(acc), "n": len(idx),
                                "n_unparsed": unparsed_in[src]}
    mean_keys = SIX_KEYS + ("f1_macro", "balanced_acc") + (("auc",) if s is not None else ())
    out["per_generator"] = per_generator
    out["per_real_source"] = per_real_source
    out["mean_over_generators"] = {k: _mean_defined([v[k] for v in per_generator.values()]) for k in mean_keys}
    out["notes"] = [
        "labels internal: 0 = real, 1 = fake",
        "real_f1 / fake_f1 = F1 of the class on its own subset = 2·acc/(1+acc); overall_f1 = binary F1, real positive",
        "per generator: all real images + that generator's fakes; real_acc is shared",
        _policy_note(unparsed),
    ]
    return out


# --------------------------------------------------------------------------------------------------
# ARForensics


def arforensics_metrics(labels: Sequence[int], preds: Sequence[int | None], groups: Sequence[str],
                        unparsed: str = "exclude", scores: Sequence[float] | None = None,
                        generators: Sequence[str] | None = None) -> dict:
    """Per-generator accuracy (over that folder's real and fake images) and its unweighted mean, the paper's
    "Mean" column; with ``scores``, AUC and AP per generator. ``generators`` fixes the order (default: first
    seen)."""
    _check(labels, preds, groups)
    y, p, mask = resolve_unparsed(labels, preds, unparsed)
    g = [grp for grp, keep in zip(groups, mask) if keep]
    s = _scored(scores, mask)
    order = list(generators) if generators is not None else list(dict.fromkeys(groups))
    per_generator = {}
    for gen in order:
        idx = [i for i in range(len(y)) if g[i] == gen]
        summary = binary_summary([y[i] for i in idx], [p[i] for i in idx])
        entry = {"acc": summary["overall_acc"], "real_acc": summary["real_acc"], "fake_acc": summary["fake_acc"],
                 "n": summary["n"], "n_real": summary["n_real"], "n_fake": summary["n_fake"],
                 "n_unparsed": sum(1 for grp, q in zip(groups, preds) if grp == gen and q is None)}
        if s is not None:
            entry.update(ranking_metrics([y[i] for i in idx], [s[i] for i in idx], with_ap=True))
        per_generator[gen] = entry
    pooled = binary_summary(y, p)
    out = {
        "mean_acc": _mean_defined([v["acc"] for v in per_generator.values()]),
        "acc": pooled["overall_acc"],
        "f1_macro": pooled["f1_macro"],
        "real_acc": pooled["real_acc"],
        "fake_acc": pooled["fake_acc"],
        "n": pooled["n"],
        "n_unparsed": sum(q is None for q in preds),
        "unparsed_policy": unparsed,
        "confusion": pooled["confusion"],
        "generators": order,
        "per_generator": per_generator,
        "notes": [
            "labels internal: 0 = real, 1 = fake",
            "mean_acc = unweighted mean of the per-generator accuracies (paper 'Mean'); acc = pooled accuracy",
            _policy_note(unparsed),
        ],
    }
    if s is not None:
        out["mean_auc"] = _mean_defined([v["auc"] for v in per_generator.values()])
        out["mean_ap"] = _mean_defined([v["ap"] for v in per_generator.values()])
    return out
