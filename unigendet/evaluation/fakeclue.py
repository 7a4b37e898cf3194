"""FakeClue-protocol evaluation job: detect every image of a FakeClue-format split, then score the
explanations (Acc over parsed answers, macro F1, ROUGE-L, CSS — as the official script) and the
detection head (Acc, macro F1, AUC), and write JSON + Markdown + ROC reports.

Entries that cannot be evaluated (missing or unreadable image, malformed entry) are counted as
errors, reported, and left out of the metrics as the official script does with crashed samples.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from unigendet.data.sources import (
    BadSample,
    load_image_file,
    parse_fakeclue_entry,
    read_json_list,
)
from unigendet.evaluation.provenance import run_provenance
from unigendet.metrics import head_metrics, text_metrics, write_report

logger = logging.getLogger(__name__)


@dataclass
class FakeClueEvalConfig:
    json_path: str
    image_root: str
    out_dir: str = "runs/eval"
    name: str = "fakeclue"
    label_convention: Literal["fakeclue", "real0_fake1"] = "fakeclue"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 42


def _load_entries(cfg: FakeClueEvalConfig):
    entries = read_json_list(Path(cfg.json_path))
    if cfg.limit is not None:
        entries = entries[: cfg.limit]
    records, errors = [], []
    for i, entry in enumerate(entries):
        try:
            records.append(parse_fakeclue_entry(entry, cfg.label_convention, f"{cfg.json_path}[{i}]"))
        except BadSample as bad:
            errors.append(str(bad))
    return records, errors


def run_fakeclue_eval(detector, cfg: FakeClueEvalConfig, model_path: str | None = None, decoding=None) -> dict:
    """Evaluate ``detector`` (a ``unigendet.inference.detect.Detector``) on ``cfg``'s split; decoding
    is greedy (the official evaluation) unless ``decoding`` (a ``DecodingConfig``) says otherwise."""
    records, errors = _load_entries(cfg)
    predictions: list[str | None] = []
    references, labels, p_fake = [], [], []
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        images, kept = [], []
        for rec in chunk:
            try:
                images.append(load_image_file(Path(cfg.image_root) / rec.image))
                kept.append(rec)
            except BadSample as bad:
                errors.append(str(bad))
        if not kept:
            continue
        # Entries of one batch may ask different questions; detect() takes one question per image.
        results = detector.detect(images, questions=[r.question for r in kept], max_new_tokens=cfg.max_new_tokens,
                                  decoding=decoding, seed=cfg.seed)
        for rec, res in zip(kept, results):
            predictions.append(res.text)
            references.append(rec.answer)
            labels.append(rec.label)
            p_fake.append(res.p_fake)
        logger.info("fakeclue eval: %d / %d", start + len(chunk), len(records))
    for err in errors[:10]:
        logger.warning("skipped: %s", err)
    metrics = {"text": text_metrics(predictions, references, labels), "head": head_metrics(p_fake, labels)}
    settings = {**asdict(cfg), "skipped_entries": len(errors),
                "decoding": asdict(decoding) if decoding is not None else "greedy"}
    provenance = run_provenance(settings, model_path, detector.model)
    paths = write_report(cfg.out_dir, cfg.name, metrics, provenance, p_fake=p_fake, labels=labels)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return metrics
