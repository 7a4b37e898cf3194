"""Evaluation metrics and reports (FakeClue protocol). Needs the ``eval`` extra (scikit-learn, rouge-score,
matplotlib) at call time; importing this package does not."""

from unigendet.metrics.fakeclue import (
    FAKECLUE_FAKE,
    FAKECLUE_REAL,
    LABEL_FAKE,
    LABEL_REAL,
    answer_scores,
    css_tfidf,
    extract_answer,
    fakeclue_to_internal,
    head_metrics,
    internal_to_fakeclue,
    parse_verdict,
    text_metrics,
)
from unigendet.metrics.report import jsonable, merge_reports, write_report

__all__ = [
    "jsonable",
    "FAKECLUE_FAKE", "FAKECLUE_REAL", "LABEL_FAKE", "LABEL_REAL", "answer_scores", "css_tfidf", "extract_answer",
    "fakeclue_to_internal", "head_metrics", "internal_to_fakeclue", "merge_reports", "parse_verdict",
    "text_metrics", "write_report",
]
