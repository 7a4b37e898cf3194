"""FakeClue-protocol evaluation job: detect every image of a FakeClue-format split, then score the
explanations (Acc over parsed answers, macro F1, ROUGE-L, CSS — as the official script) and the
detection head (Acc, macro F1, AUC), and write JSON + Markdown + ROC reports.

Scoring runs through the sharded, resumable harness (:mod:`unigendet.evaluation.harness`): outputs go to
``<out_dir>/<name>.work/<setting>/shard-*/outputs.jsonl``; a killed job re-run with the same arguments
continues where it stopped, and the report is written once every shard is complete.

Entries that cannot be evaluated (missing or unreadable image, malformed entry) are counted as
errors, reported, and left out of the metrics as the official script does with crashed samples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal

from unigendet.evaluation.benchmarks import Benchmark, load_fakeclue
from unigendet.evaluation.detectors import as_image_detector
from unigendet.evaluation.harness import error_summary, require_scorable, score_benchmark
from unigendet.evaluation.provenance import run_provenance, weights_fingerprint
from unigendet.inference.detect import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED
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
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = DEFAULT_SEED
    setting: str = "none"  # robustness perturbation (unigendet.evaluation.robustness)
    perturb_seed: int = 0
    shard: str | None = None  # "I/N"; default RANK/WORLD_SIZE, else the whole split
    overwrite: bool = False  # discard shard outputs written with different settings
    gather_only: bool = False  # score nothing; report from the shards already complete


def load_fakeclue_benchmark(cfg: FakeClueEvalConfig) -> Benchmark:
    return load_fakeclue(cfg.json_path, cfg.image_root, cfg.label_convention, cfg.limit)


def fakeclue_scores(benchmark: Benchmark, outputs: list[dict]) -> dict:
    """``{"text": text_metrics, "head": head_metrics, "errors": ...}`` over the scored outputs; ``text`` is
    left out when the detector gives no explanations, ``head`` when it gives no p(fake) (both are kept, empty,
    when no image could be scored)."""
    ok = [o for o in outputs if o["error"] is None]
    metrics: dict = {}
    if not ok or any(o["text"] is not None for o in ok):
        references = [benchmark.records[o["index"]].reference for o in ok]
        metrics["text"] = text_metrics([o["text"] for o in ok], references, [o["label"] for o in ok])
    scored = [o for o in ok if math.isfinite(o["p_fake"])]
    if scored or not ok:
        metrics["head"] = head_metrics([o["p_fake"] for o in scored], [o["label"] for o in scored])
        if len(scored) < len(ok):
            metrics["head"]["notes"].append(f"{len(ok) - len(scored)} outputs without p_fake left out")
    metrics["errors"] = error_summary(outputs, benchmark.invalid)
    return metrics


def fakeclue_summary(metrics: dict) -> dict[str, float]:
    """The robustness-table numbers of one setting (dotted keys into ``metrics``)."""
    keys = {"text": ("acc", "f1_macro", "rouge_l", "css", "n_unparsed"), "head": ("acc", "f1_macro", "auc")}
    return {f"{section}.{k}": metrics[section][k] for section, ks in keys.items() if section in metrics for k in ks}


def job_identity(benchmark: str, detector, model_path) -> dict:
    """What, besides the records and the perturbation, decides a job's outputs (the harness fingerprint)."""
    return {"benchmark": benchmark, "weights_sha256": weights_fingerprint(model_path),
            "detector": detector.describe()}


def run_fakeclue_eval(detector, cfg: FakeClueEvalConfig, model_path: str | None = None, decoding=None) -> dict | None:
    """Evaluate ``detector`` (a ``unigendet.inference.detect.UniGenDetDetector`` or an
    :class:`~unigendet.evaluation.detectors.ImageDetector`) on ``cfg``'s split; decoding is greedy (the
    official evaluation) unless ``decoding`` (a ``DecodingConfig``) says otherwise. Returns the metrics, or
    None when this process ran its shard and others are still missing (no report yet)."""
    benchmark = load_fakeclue_benchmark(cfg)
    scorer = None if detector is None else as_image_detector(detector, cfg.max_new_tokens, decoding, cfg.seed)
    identity = None if scorer is None else job_identity("fakeclue", scorer, model_path)
    run = score_benchmark(scorer, benchmark.records, cfg.out_dir, cfg.name, identity, cfg.setting, cfg.perturb_seed,
                          cfg.batch_size, cfg.shard, cfg.overwrite, cfg.gather_only)
    if run.outputs is None:
        return None
    require_scorable(run.outputs, benchmark.invalid, f"FakeClue {cfg.json_path}")
    metrics = fakeclue_scores(benchmark, run.outputs)
    for err in metrics["errors"]["examples"]:
        logger.warning("skipped: %s", err)
    settings = {**asdict(cfg), "skipped_entries": metrics["errors"]["n_skipped"],
                "decoding": asdict(decoding) if decoding is not None else "greedy", "job": run.fingerprint}
    provenance = run_provenance(settings, model_path, getattr(scorer, "model", None), seed=cfg.seed)
    head = [o for o in run.outputs if o["error"] is None and math.isfinite(o["p_fake"])]
    roc = {"p_fake": [o["p_fake"] for o in head], "labels": [o["label"] for o in head]} if head else {}
    paths = write_report(cfg.out_dir, cfg.name, metrics, provenance, **roc)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return metrics
