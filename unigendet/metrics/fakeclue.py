"""FakeClue detection + explanation metrics (accuracy, macro F1, ROUGE-L, CSS), computed as the official
UniGenDet evaluation script ``eval/det/fakevlm_test.py`` computes them.

Every function takes and returns internal labels (``0 = real, 1 = fake``; FakeClue's files use the opposite and
are converted at load time by :mod:`unigendet.labels`). Accuracy, macro F1 and the confusion matrix do not
depend on the encoding, so the numbers equal the official script's. Rates are fractions in [0, 1]; the paper
prints them ×100.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from unigendet.labels import CLASS_NAMES, FAKE_PHRASE, LABEL_FAKE, LABEL_REAL, REAL_PHRASE, parse_verdict

ANSWER_START = "<|im_start|>"
ANSWER_END = "<|im_end|>"


def extract_answer(raw: str) -> str:
    """The scored part of a raw decoded generation: the text after the first ``<|im_start|>`` and before the next
    ``<|im_end|>`` (BAGEL's inferencer: ``raw.split(END)[0].split(START)[1]``). Text without ``<|im_start|>`` is
    returned up to the first ``<|im_end|>`` (the official code would raise there; we are lenient). Use this
    only on raw decodes that still contain the markers; an already clean answer passes through unchanged."""
    head = raw.split(ANSWER_END, 1)[0]
    parts = head.split(ANSWER_START)
    return parts[1] if len(parts) > 1 else parts[0]


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("FakeClue ROUGE-L needs rouge-score (pip install 'unigendet[eval]')") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def css_tfidf(reference: str, answer: str) -> float:
    """TF-IDF cosine of one (reference, answer) pair; a fresh default TfidfVectorizer is fitted on these two
    documents only. Raises ValueError (from sklearn) when neither text has a token of >= 2 characters."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    tfidf = TfidfVectorizer().fit_transform([reference, answer])
    return float(cosine_similarity(tfidf[0:1], tfidf[1:2])[0][0])


def answer_scores(reference: str, answer: str, scorer=None) -> tuple[float, float]:
    """(ROUGE-L F, CSS) of one answer with the official guards; ``answer`` is lowercased first.

    ROUGE-L is ``RougeScorer(["rougeL"], use_stemmer=True)``'s F-measure. An empty answer or reference scores
    0.0 for both; when TF-IDF finds no token of two or more characters, CSS is 0.0 and ROUGE-L is kept.
    """
    response = answer.lower()
    rouge, css = 0.0, 0.0
    if response and reference:
        scorer = scorer or _rouge_scorer()
        rouge = float(scorer.score(reference, response)["rougeL"].fmeasure)  # score(target, prediction)
        try:
            css = css_tfidf(reference, response)
        except ValueError:  # empty vocabulary: CSS stays 0.0, ROUGE-L is kept
            css = 0.0
    return rouge, css


def _check_labels(labels: Sequence[int], n: int) -> list[int]:
    if len(labels) != n:
        raise ValueError(f"{n} predictions but {len(labels)} labels")
    out = []
    for y in labels:
        y = int(y)
        if y not in (LABEL_REAL, LABEL_FAKE):
            raise ValueError(f"labels must use the internal convention (0 = real, 1 = fake), got {y!r}")
        out.append(y)
    return out


def _macro_f1(gts: list[int], preds: list[int]) -> float:
    """sklearn macro F1 over the labels present (the official call); 0.0 when empty."""
    if not gts:
        return 0.0
    from sklearn.metrics import f1_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning cannot occur with present labels, but be quiet
        return float(f1_score(gts, preds, average="macro"))


def confusion_2x2(gts: Sequence[int], preds: Sequence[int]) -> list[list[int]]:
    """Counts ``[[real->real, real->fake], [fake->real, fake->fake]]``: rows = true, columns = predicted."""
    m = [[0, 0], [0, 0]]
    for t, p in zip(gts, preds):
        m[t][p] += 1
    return m


def _recalls(m: list[list[int]]) -> dict[str, float]:
    out = {}
    for k, name in enumerate(CLASS_NAMES):
        row = sum(m[k])
        out[f"{name}_acc"] = m[k][k] / row if row else math.nan
    return out


def text_metrics(predictions: Sequence[str | None], references: Sequence[str], labels: Sequence[int],
                 return_samples: bool = False) -> dict:
    """FakeClue text metrics for generated answers.

    ``predictions[i]``: the model's answer (the scored text, see :func:`extract_answer`), or None for a crashed
    sample (the official script's ``"error"`` records), which is left out of every metric. ``references[i]``:
    the ground-truth answer (FakeClue's gpt turn, including its leading "This is a … image." sentence).
    ``labels[i]``: internal label (0 = real, 1 = fake).

    Returns (fractions in [0, 1]):
      ``acc``      correct / n_parsed, the verdict read by :func:`~unigendet.labels.parse_verdict` (NaN when
                   n_parsed == 0; the official script prints "N/A")
      ``f1_macro`` sklearn macro F1 over parsed answers, labels present only (0.0 when n_parsed == 0)
      ``rouge_l``, ``css``  means over the n_scored non-crashed answers, parsed or not, correct or not (0.0
                   when there are none)
      ``n``, ``n_errors`` (crashed), ``n_scored`` (= n - n_errors), ``n_parsed``, ``n_unparsed``,
      ``n_correct``, ``n_both_phrases`` (answers with both phrases, parsed as real)
      ``confusion`` 2×2 over parsed answers, rows true (real, fake), columns predicted (real, fake);
      ``unparsed_by_class`` {"real": k, "fake": k} (true class of unparsed answers)
      extras, not official: ``real_acc`` / ``fake_acc`` (per-class accuracy over parsed answers),
      ``acc_unparsed_as_wrong`` = n_correct / n_scored.
    With ``return_samples`` a per-answer list (``pred``, ``label``, ``rouge_l``, ``css``; ``pred`` None when
    unparsed, the entry None when crashed) is added under ``samples``.
    """
    n = len(predictions)
    if len(references) != n:
        raise ValueError(f"{n} predictions but {len(references)} references")
    labels = _check_labels(labels, n)

    scorer = _rouge_scorer() if n else None
    gts, preds, samples = [], [], []
    n_errors = n_both = 0
    unparsed = {"real": 0, "fake": 0}
    rouge_sum = css_sum = 0.0
    for answer, reference, y in zip(predictions, references, labels):
        if answer is None:
            n_errors += 1
            samples.append(None)
            continue
        pred = parse_verdict(answer)
        low = answer.lower()
        n_both += REAL_PHRASE in low and FAKE_PHRASE in low
        if pred is None:
            unparsed[CLASS_NAMES[y]] += 1
        else:
            gts.append(y)
            preds.append(pred)
        rouge, css = answer_scores(reference, answer, scorer)
        rouge_sum += rouge
        css_sum += css
        samples.append({"pred": pred, "label": y, "rouge_l": rouge, "css": css})

    n_scored = n - n_errors
    n_parsed = len(gts)
    n_correct = sum(int(t == p) for t, p in zip(gts, preds))
    m = confusion_2x2(gts, preds)
    out = {
        "acc": n_correct / n_parsed if n_parsed else math.nan,
        "f1_macro": _macro_f1(gts, preds),
        "rouge_l": rouge_sum / n_scored if n_scored else 0.0,
        "css": css_sum / n_scored if n_scored else 0.0,
        "n": n,
        "n_errors": n_errors,
        "n_scored": n_scored,
        "n_parsed": n_parsed,
        "n_unparsed": n_scored - n_parsed,
        "n_correct": n_correct,
        "n_both_phrases": int(n_both),
        "confusion": m,
        "unparsed_by_class": unparsed,
        **_recalls(m),
        "acc_unparsed_as_wrong": n_correct / n_scored if n_scored else math.nan,
        "notes": [
            "labels internal: 0 = real, 1 = fake",
            "acc and f1_macro over parsed answers only; unparsed and crashed answers excluded",
            "rouge_l / css averaged over all non-crashed answers (official FakeClue protocol)",
        ],
    }
    if n_parsed == 0:
        out["notes"].append("no answer parsed: acc undefined (NaN), f1_macro = 0.0 as in the official script")
    if return_samples:
        out["samples"] = samples
    return out


def head_metrics(p_fake: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Metrics of the detection head's p(fake) against internal labels (0 = real, 1 = fake).

    Predicted fake when ``p_fake >= threshold``: at 0.5 this is the argmax of the official 2-class head, whose
    logits are ordered (fake, real) so a tie goes to fake. Returns ``acc``, ``f1_macro`` (sklearn macro over the
    labels present, as for text), ``auc`` (``roc_auc_score(labels, p_fake)``, fake = positive; NaN with a note
    when only one class is present), ``confusion`` (rows true real/fake, columns predicted real/fake),
    ``real_acc`` / ``fake_acc``, counts and the threshold.
    """
    labels = _check_labels(labels, len(p_fake))
    scores = [float(p) for p in p_fake]
    if any(not math.isfinite(p) for p in scores):
        raise ValueError("p_fake contains NaN or inf")
    preds = [int(p >= threshold) for p in scores]
    n = len(labels)
    m = confusion_2x2(labels, preds)
    notes = ["labels internal: 0 = real, 1 = fake", f"predicted fake when p_fake >= {threshold}"]
    present = set(labels)
    if len(present) == 2:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(labels, scores))
    else:
        auc = math.nan
        which = "no samples" if not present else f"single class present ({CLASS_NAMES[present.pop()]} only)"
        notes.append(f"auc undefined: {which}")
    n_correct = m[0][0] + m[1][1]
    return {
        "acc": n_correct / n if n else math.nan,
        "f1_macro": _macro_f1(labels, preds),
        "auc": auc,
        "n": n,
        "n_real": labels.count(LABEL_REAL),
        "n_fake": labels.count(LABEL_FAKE),
        "n_correct": n_correct,
        "threshold": float(threshold),
        "confusion": m,
        **_recalls(m),
        "notes": notes,
    }
