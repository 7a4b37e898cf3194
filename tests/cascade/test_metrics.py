"""Cascade metrics on hand-worked output lines."""

from __future__ import annotations

import math

import pytest

from unigendet.cascade.metrics import cascade_metrics, cascade_table, decision_metrics


def _line(label, decision, stage, b, s=None, m=None, latency=None, p=None, error=None):
    final = p if p is not None else (m if m is not None else (s if s is not None else b))
    return {"label": label, "p_fake": final, "error": error,
            "details": {"decision": decision, "stage_exited": stage, "binary_score": b, "spectral_score": s,
                        "mllm_confidence": m, "flags": [], "latency_ms": latency or {}}}


LINES = [
    _line(0, "pass", "binary", 0.1, latency={"binary": 1.0}),
    _line(1, "pass", "binary", 0.2, latency={"binary": 2.0}),  # a fake let through at stage 1
    _line(0, "pass", "spectral", 0.5, 0.3, latency={"binary": 3.0, "spectral": 10.0}),
    _line(1, "block", "mllm", 0.6, 0.7, 0.9, latency={"binary": 4.0, "spectral": 20.0, "mllm": 100.0}),
    _line(0, "escalate", "mllm", 0.7, 0.8, 0.6, latency={"binary": 5.0, "spectral": 30.0, "mllm": 300.0}),
    _line(1, "escalate", "mllm", 0.8, 0.9, 0.7, latency={"binary": 6.0, "spectral": 40.0, "mllm": 200.0}),
    {"label": 1, "p_fake": math.nan, "error": "unreadable_image: x", "text": None},  # not counted
]


def test_hand_worked_cascade_metrics():
    m = cascade_metrics(LINES)
    assert m["n"] == 6
    cons, abst = m["decisions"]["conservative"], m["decisions"]["abstain"]
    # conservative: escalations are "fake". fakes: 1 passed, 1 blocked, 1 escalated -> TP 2, FN 1; reals: 2 passed,
    # 1 escalated -> FP 1, TN 2
    assert (cons["tp"], cons["fn"], cons["fp"], cons["tn"]) == (2, 1, 1, 2)
    assert cons["acc"] == pytest.approx(4 / 6) and cons["fnr"] == pytest.approx(1 / 3)
    assert cons["fpr"] == pytest.approx(1 / 3)
    # abstain: the two escalations are left out
    assert (abst["tp"], abst["fn"], abst["fp"], abst["tn"], abst["n_excluded"]) == (1, 1, 0, 2, 2)
    assert abst["acc"] == pytest.approx(3 / 4) and abst["fnr"] == 0.5 and abst["fpr"] == 0.0
    assert m["escalation_rate"] == pytest.approx(2 / 6)
    assert m["reach"] == pytest.approx({"binary": 1.0, "spectral": 4 / 6, "mllm": 3 / 6})
    assert m["exits"] == pytest.approx({"binary": 2 / 6, "spectral": 1 / 6, "mllm": 3 / 6})
    assert m["latency_ms"]["binary"]["mean"] == pytest.approx(3.5)
    assert m["latency_ms"]["binary"]["p95"] == pytest.approx(5.75)  # 5 + 0.75 * (6 - 5)
    assert m["latency_ms"]["mllm"] == pytest.approx({"mean": 200.0, "p95": 290.0, "n": 3})
    # final scores 0.1, 0.2, 0.3, 0.9, 0.6, 0.7 (fakes 0.2, 0.9, 0.7; reals 0.1, 0.3, 0.6): 7 of 9 pairs ordered
    assert m["final_score"]["auc"] == pytest.approx(7 / 9)
    # stage AUCs on the images that reached each stage
    assert m["stage_auc"]["binary"]["auc"] == pytest.approx(6 / 9)  # b: reals .1 .5 .7, fakes .2 .6 .8
    assert m["stage_auc"]["spectral"]["auc"] == pytest.approx(3 / 4)  # s: reals .3 .8, fakes .7 .9
    assert m["stage_auc"]["mllm"]["n"] == 3 and m["stage_auc"]["mllm"]["auc"] == pytest.approx(1.0)


def test_stage_auc_is_nan_with_a_reason_when_one_class_reached():
    lines = [_line(0, "pass", "binary", 0.1), _line(1, "block", "mllm", 0.9, 0.9, 0.95)]
    m = cascade_metrics(lines)
    assert math.isnan(m["stage_auc"]["mllm"]["auc"]) and "one class only (fake" in m["stage_auc"]["mllm"]["reason"]
    assert m["stage_auc"]["binary"]["reason"] is None
    empty = cascade_metrics([_line(0, "pass", "binary", 0.1)])
    assert empty["stage_auc"]["spectral"]["reason"] == "no image reached this stage"
    assert math.isnan(empty["latency_ms"]["spectral"]["mean"])
    table = cascade_table({"casc": m}, "t")
    assert "| casc |" in table and "AUC binary: N/A" not in table and "casc, AUC mllm: N/A, one class" in table


def test_decision_modes():
    assert decision_metrics([1, 0], ["escalate", "escalate"], "abstain")["n"] == 0
    with pytest.raises(ValueError):
        decision_metrics([1], ["pass"], "other")
