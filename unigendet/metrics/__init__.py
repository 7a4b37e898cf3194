"""Evaluation metrics and reports: FakeClue protocol (``fakeclue``), DMimage / ARForensics (``detection``),
reports and plots (``report``). Needs the ``eval`` extra (scikit-learn, rouge-score, matplotlib) at call time;
importing this package does not."""

from unigendet.metrics.detection import (
    arforensics_metrics,
    binary_summary,
    dmimage_metrics,
    head_predictions,
    resolve_unparsed,
)
from unigendet.metrics.fakeclue import (
    answer_scores,
    css_tfidf,
    extract_answer,
    head_metrics,
    text_metrics,
)
from unigendet.metrics.report import (
    bar_chart_png,
    curves_png,
    jsonable,
    markdown_table,
    merge_reports,
    write_report,
)

__all__ = [
    "jsonable",
    "answer_scores", "css_tfidf", "extract_answer", "head_metrics", "merge_reports", "text_metrics", "write_report",
    "arforensics_metrics", "bar_chart_png", "binary_summary", "curves_png", "dmimage_metrics", "head_predictions",
    "markdown_table", "resolve_unparsed",
]
