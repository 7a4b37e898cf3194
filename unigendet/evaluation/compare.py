"""``eval compare``: several detectors scored on the same split, in one report.

Each detector of :class:`CompareConfig` (``{name, model: {detector, path, ...}, ...}``: UniGenDet or any saved
baseline) is scored on the split ``base`` names (FakeClue or any detection benchmark) as its own sharded, resumable
harness job, ``<out_dir>/<name>-<detector name>.work/``; a re-run skips finished work and a detector whose job is
complete scores nothing. The report ``<out_dir>/<name>.{json,md}`` holds one row per detector:

* Acc, real Acc, fake Acc, AP and AUC of the head's p(fake) at 0.5 (for per-group benchmarks, Acc, AP and AUC are
  the unweighted means over groups, as the papers report them; real / fake Acc are pooled), the parsed-text Acc
  where the detector explains, the number of images scored;
* images/s: images over the seconds spent inside the detector's ``score`` (image decoding excluded), summed
  over every run and shard of its job;
* peak memory while the detector was loaded and scoring: the CUDA allocator's peak on a GPU, the process's peak
  resident set on CPU;
* the figures the detector's paper reports on the same split (:data:`REPORTED`), with their source, only where
  the split matches (same benchmark, split and groups; no image limit; no perturbation).

``<name>_roc.png`` draws every detector's ROC curve in one plot. A tiered cascade (``model.detector: cascade``) gets
its usual row (its p(fake) is its final score) and, in a second table, its decision metrics (ESCALATE counted as
fake or left out), escalation rate, share of images reaching each stage, per-stage AUC and latency
(:mod:`unigendet.cascade.metrics`, from the details stored with each output line).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from unigendet.cascade.metrics import cascade_lines, cascade_metrics, cascade_table
from unigendet.config.loader import ConfigError, to_dict
from unigendet.evaluation.benchmarks import ARFORENSICS_GENERATORS, Benchmark
from unigendet.evaluation.detectors import (
    DetectorSource,
    ImageDetector,
    baseline_options_unset,
    load_image_detector,
)
from unigendet.evaluation.fakeclue import FakeClueEvalConfig, job_identity
from unigendet.evaluation.harness import (
    JobSpec,
    ScoredRun,
    require_scorable,
    resolve_shard,
    score_benchmark,
    shard_dirname,
    work_dir_for,
)
from unigendet.evaluation.jobs import DetectionEvalConfig, benchmark_metrics, benchmark_name, load_benchmark
from unigendet.evaluation.provenance import run_provenance
from unigendet.inference.detect import DecodingConfig
from unigendet.inference.loading import DetectorOptions, resolve_device
from unigendet.labels import DetectionResult
from unigendet.metrics.detection import ranking_metrics
from unigendet.metrics.report import markdown_table, write_report

logger = logging.getLogger(__name__)

_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
PERF_DIR = "perf"
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class CompareEntry:
    """One detector of a comparison: ``name`` labels its row (and its job directory), ``model`` says which
    detector and where (``model.detector``: ``unigendet`` or a baseline name). ``detector``, ``decoding`` and
    ``max_new_tokens`` (None: the base config's) apply to UniGenDet only."""

    name: str
    model: DetectorSource
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    max_new_tokens: int | None = None

    def validate(self) -> None:
        if not _ENTRY_NAME.match(self.name):
            raise ConfigError(f"name {self.name!r}: letters, digits and _ . + - only (it names a directory)")
        if self.model.is_unigendet:
            return
        baseline_options_unset(self.detector)
        if self.decoding != DecodingConfig() or self.max_new_tokens is not None:
            raise ConfigError(f"decoding and max_new_tokens apply to unigendet only, not {self.model.detector!r}")


@dataclass
class CompareConfig:
    """Every detector of ``detectors`` scored on the split ``base`` names (a FakeClue or detection benchmark
    config; its ``name`` is not used, its other settings apply to every detector); one report ``<base.out_dir>/
    <name>`` (default ``compare_<benchmark>``). ``device``: where detectors without a ``model.device`` run
    (default cuda when available, else cpu)."""

    base: FakeClueEvalConfig | DetectionEvalConfig
    detectors: list[CompareEntry]
    name: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("detectors: a comparison needs at least one detector")
        names = [entry.name for entry in self.detectors]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"detectors: names must differ, {twice} used more than once")
        self.name = self.name or f"compare_{benchmark_name(self.base)}"


# --------------------------------------------------------------------------------------------------
# Published figures


@dataclass(frozen=True)
class ReportedFigure:
    """Figures (in %) a paper reports for ``detector`` on one split: ``benchmark``, ``split`` (None for benchmarks
    without a split choice) and ``groups`` (None: every group of the benchmark as released, no selection)."""

    detector: str
    benchmark: str
    split: str | None
    groups: tuple[str, ...] | None
    figures: dict[str, float]
    source: str


_LTD = "LTD paper (CVPR 2026), main comparison: mean over test subsets"
_LTD_UFD_SUBSETS = ("progan", "stylegan", "stylegan2", "biggan", "cyclegan", "stargan", "gaugan", "deepfake",
                    "guided", "ldm_200", "ldm_200_cfg", "ldm_100", "glide_100_27", "glide_50_27", "glide_100_10",
                    "dalle")
_CORIT_UFD = "CoRIT paper (arXiv 2603.24057), Tables IV/V: UniversalFakeDetect, ProGAN training"
_CORIT_UFD_SUBSETS = {  # subset: (AP, Acc)
    "progan": (100.0, 99.99), "cyclegan": (100.0, 99.70), "biggan": (99.96, 98.95), "stylegan": (99.91, 93.33),
    "gaugan": (100.0, 99.20), "stargan": (100.0, 100.0), "deepfake": (92.24, 51.90), "seeingdark": (97.14, 87.22),
    "san": (65.89, 59.36), "crn": (99.95, 97.35), "imle": (100.0, 97.35), "guided": (96.31, 78.25),
    "ldm_200": (99.81, 97.00), "ldm_200_cfg": (98.30, 86.60), "ldm_100": (99.81, 96.55),
    "glide_100_27": (99.08, 88.90), "glide_50_27": (99.19, 91.25), "glide_100_10": (99.00, 88.65),
    "dalle": (99.56, 95.35),
}
_CORIT_FACES = "CoRIT paper (arXiv 2603.24057), Table I: frame-level AUC, FaceForensics++ (c23) training"
_CORIT_FACE_AUC = {"Celeb-DF-v1": 90.9, "Celeb-DF-v2": 89.1, "DFDCP": 88.8, "DFDC": 84.5, "DeepFakeDetection": 91.3}
_UNIGENDET = "UniGenDet paper (CVPR 2026), {table}; verdicts parsed from the explanations"
_UNIGENDET_ARF = dict(zip(ARFORENSICS_GENERATORS, (89.4, 99.7, 99.9, 99.7, 99.5, 98.8, 99.5)))

REPORTED: tuple[ReportedFigure, ...] = (
    ReportedFigure("ltd", "ufd", "test", _LTD_UFD_SUBSETS, {"acc": 96.90, "ap": 99.51}, _LTD + " (16 UFD subsets)"),
    ReportedFigure("ltd", "drct2m", "val", None, {"acc": 99.54, "ap": 99.99}, _LTD + " (DRCT-2M)"),
    ReportedFigure("ltd", "genimage", "val", None, {"acc": 91.62, "ap": 97.17}, _LTD + " (GenImage)"),
    ReportedFigure("ltd", "genimage", "val", ("Midjourney",), {"acc": 62.97}, "LTD paper (CVPR 2026), GenImage "
                   "Midjourney subset"),
    ReportedFigure("corit", "ufd", "test", tuple(_CORIT_UFD_SUBSETS), {"acc": 89.84, "ap": 97.17},
                   _CORIT_UFD + ", mAcc / mAP over 19 subsets"),
    *(ReportedFigure("corit", "ufd", "test", (subset,), {"acc": acc, "ap": ap}, _CORIT_UFD + f", subset {subset}")
      for subset, (ap, acc) in _CORIT_UFD_SUBSETS.items()),
    ReportedFigure("corit", "deepfakebench", "test", tuple(_CORIT_FACE_AUC), {"auc": 88.9},
                   _CORIT_FACES + ", average of five datasets"),
    *(ReportedFigure("corit", "deepfakebench", "test", (dataset,), {"auc": auc}, _CORIT_FACES + f", {dataset}")
      for dataset, auc in _CORIT_FACE_AUC.items()),
    ReportedFigure("unigendet", "fakeclue", None, None, {"acc": 98.0, "f1": 97.7},
                   _UNIGENDET.format(table="Table 1: FakeClue test set")),
    ReportedFigure("unigendet", "dmimage", None, None,
                   {"real_acc": 99.0, "fake_acc": 97.2, "acc": 98.6, "f1": 99.1},
                   _UNIGENDET.format(table="Table 2: DMimage (overall F1 with real as positive)")),
    ReportedFigure("unigendet", "arforensics", None, None, {"acc": 98.1},
                   _UNIGENDET.format(table="Table 3: ARForensics, mean over 7 generators")),
    *(ReportedFigure("unigendet", "arforensics", None, (gen,), {"acc": acc},
                     _UNIGENDET.format(table=f"Table 3: ARForensics, {gen}"))
      for gen, acc in _UNIGENDET_ARF.items()),
)

_FIGURE_NAMES = {"acc": "Acc", "real_acc": "real Acc", "fake_acc": "fake Acc", "ap": "AP", "auc": "AUC", "f1": "F1"}


def _normalised(names: Sequence[str]) -> set[str]:
    """Group names compared without case and punctuation (``Janus_Pro`` = ``janus-pro``)."""
    return {re.sub(r"[^a-z0-9]", "", name.lower()) for name in names}


def reported_figures(detector: str, base: FakeClueEvalConfig | DetectionEvalConfig,
                     benchmark: Benchmark) -> list[ReportedFigure]:
    """The published figures of ``detector`` whose split is the one ``base`` scores: same benchmark, split and
    groups (a figure without groups needs the whole benchmark, ``groups`` unset), every image (no limit) and
    no perturbation."""
    kind = benchmark_name(base)
    limit = base.limit if isinstance(base, FakeClueEvalConfig) else base.limit_per_group
    if limit is not None or base.setting != "none":
        return []
    split = getattr(base, "split", None)
    selected = getattr(base, "groups", None)
    found = []
    for fig in REPORTED:
        if fig.detector != detector or fig.benchmark != kind or fig.split != split:
            continue
        if fig.groups is None and selected is not None:
            continue
        if fig.groups is not None and _normalised(fig.groups) != _normalised(benchmark.groups):
            continue
        found.append(fig)
    return found


def _reported_text(figures: Sequence[ReportedFigure], sources: list[str]) -> str:
    """``Acc 96.90 · AP 99.51 [1]`` per figure, numbering each source in ``sources``."""
    parts = []
    for fig in figures:
        if fig.source not in sources:
            sources.append(fig.source)
        values = " · ".join(f"{_FIGURE_NAMES[k]} {v:.2f}" for k, v in fig.figures.items())
        parts.append(f"{values} [{sources.index(fig.source) + 1}]")
    return "; ".join(parts) if parts else "—"


# --------------------------------------------------------------------------------------------------
# Throughput and memory


class TimedDetector:
    """An :class:`ImageDetector` that counts the images it scores and the seconds spent scoring them."""

    def __init__(self, inner: ImageDetector):
        self.inner = inner
        self.images = 0
        self.seconds = 0.0

    @property
    def model(self):
        return getattr(self.inner, "model", None)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def score(self, images: Sequence, questions: Sequence[str | None] | None = None) -> list[DetectionResult]:
        start = time.perf_counter()
        results = self.inner.score(images, questions)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # asynchronous kernels finish inside the timed span
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        return results


class PeakMemory:
    """Peak memory from :meth:`start` on: the process's resident set (Linux: ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``; elsewhere ``getrusage``'s lifetime peak, which an earlier detector may have set)
    and, on a CUDA device, ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_method = "getrusage ru_maxrss (process lifetime peak)"
        self.rss_at_start: int | None = None

    def start(self) -> None:
        self.rss_at_start = _proc_status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
            if _proc_status_bytes("VmHWM") is not None:
                self.rss_method = "VmHWM (peak resident set since the detector was loaded)"
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, Any]:
        hwm = _proc_status_bytes("VmHWM") if self.rss_method.startswith("VmHWM") else None
        if hwm is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
        cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        # The resident set at the start only says how much the detector added when the peak was reset there.
        at_start = self.rss_at_start if self.rss_method.startswith("VmHWM") else None
        return {"peak_rss_bytes": int(hwm), "rss_at_start_bytes": at_start, "rss_method": self.rss_method,
                "peak_cuda_bytes": cuda, "device": str(self.device)}


def _proc_status_bytes(field_name: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _job_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _perf_path(work_dir: Path, index: int, count: int) -> Path:
    return work_dir / PERF_DIR / f"{shard_dirname(index, count)}.json"


def record_perf(path: Path, digest: str, images: int, seconds: float, memory: dict[str, Any]) -> None:
    """Add one run's images and seconds to ``path`` (a shard's totals for the job ``digest``; totals of another
    job are replaced) and keep the larger memory peaks."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    if old.get("job") != digest:
        old = {}
    peaks = {k: _larger(old.get(k), memory[k]) for k in ("peak_rss_bytes", "peak_cuda_bytes")}
    # The resident set when the detector was loaded, of the run whose peak is kept (the detector's own share).
    newest_peak = peaks["peak_rss_bytes"] == memory["peak_rss_bytes"]
    at_start = memory.get("rss_at_start_bytes") if newest_peak else old.get("rss_at_start_bytes")
    doc = {"job": digest, "images": old.get("images", 0) + images, "seconds": old.get("seconds", 0.0) + seconds,
           "runs": old.get("runs", 0) + 1, **peaks, "rss_at_start_bytes": at_start,
           "rss_method": memory["rss_method"], "device": memory["device"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def job_perf(work_dir: Path, count: int, digest: str) -> dict[str, Any]:
    """Throughput and memory of a job over its ``count`` shards: images/s (NaN when no run was measured) and the
    largest peaks."""
    shards = []
    for index in range(count):
        try:
            doc = json.loads(_perf_path(work_dir, index, count).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("job") == digest:
            shards.append(doc)
    images = sum(d["images"] for d in shards)
    seconds = sum(d["seconds"] for d in shards)

    def peak(key: str) -> int | None:
        values = [d[key] for d in shards if d.get(key) is not None]
        return max(values) if values else None

    top = max((d for d in shards if d.get("peak_rss_bytes") is not None), key=lambda d: d["peak_rss_bytes"],
              default={})
    return {"images_per_s": images / seconds if seconds > 0 else math.nan, "timed_images": images,
            "timed_seconds": seconds, "measured_shards": len(shards), "peak_rss_bytes": peak("peak_rss_bytes"),
            "rss_at_start_bytes": top.get("rss_at_start_bytes"), "peak_cuda_bytes": peak("peak_cuda_bytes"),
            "rss_method": shards[0]["rss_method"] if shards else None,
            "device": shards[0]["device"] if shards else None}


def _memory_text(perf: dict[str, Any]) -> str:
    if perf["peak_cuda_bytes"] is not None:
        return f"{perf['peak_cuda_bytes'] / MIB:.1f} MiB (CUDA)"
    if perf["peak_rss_bytes"] is None:
        return "—"
    text = f"{perf['peak_rss_bytes'] / MIB:.1f} MiB (RSS"
    if perf.get("rss_at_start_bytes") is not None:
        text += f", +{(perf['peak_rss_bytes'] - perf['rss_at_start_bytes']) / MIB:.1f} over the start"
    return text + ")"


# --------------------------------------------------------------------------------------------------
# Scoring


def _release(device: torch.device) -> None:
    """Free a detector that is no longer referenced before the next one is loaded and measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_entry(entry: CompareEntry, cfg: CompareConfig, benchmark: Benchmark) -> tuple[ScoredRun, str]:
    """Score (this shard of) ``benchmark`` with one detector in its own job; (the run, the job's digest).

    The detector is loaded even when its job is complete (its weights are part of the job's fingerprint, so
    changed weights are never mixed with old outputs); the images this run scores add to its images/s and memory
    figures. ``gather_only`` loads nothing."""
    base = cfg.base
    job_name = f"{cfg.name}-{entry.name}"
    harness = dict(setting=base.setting, perturb_seed=base.perturb_seed, batch_size=base.batch_size,
                   shard=base.shard, overwrite=base.overwrite)
    if base.gather_only:
        run = score_benchmark(None, benchmark.records, base.out_dir, job_name, None, gather_only=True, **harness)
        return run, _job_digest(run.fingerprint or {})
    source = replace(entry.model, device=entry.model.device or cfg.device)
    device = resolve_device(source.device)
    memory = PeakMemory(device)
    memory.start()
    max_new_tokens = base.max_new_tokens if entry.max_new_tokens is None else entry.max_new_tokens
    scorer = TimedDetector(load_image_detector(source, entry.detector, max_new_tokens=max_new_tokens,
                                               decoding=entry.decoding, seed=base.seed, batch_size=base.batch_size))
    identity = job_identity(benchmark_name(base), scorer, entry.model.path)
    shard = resolve_shard(base.shard)
    job = JobSpec(work_dir_for(base.out_dir, job_name, base.setting), identity, base.setting, base.perturb_seed,
                  base.batch_size)
    digest = _job_digest(job.fingerprint(benchmark.records, shard.count))
    try:
        run = score_benchmark(scorer, benchmark.records, base.out_dir, job_name, identity, **harness)
    finally:
        if scorer.images:
            record_perf(_perf_path(job.work_dir, shard.index, shard.count), digest, scorer.images, scorer.seconds,
                        memory.read())
        logger.info("%s: %d image(s) scored in %.2f s", entry.name, scorer.images, scorer.seconds)
        del scorer
        _release(device)
    return run, digest


def detector_summary(kind: str, metrics: dict, outputs: Sequence[dict]) -> dict[str, Any]:
    """The comparison row of one detector from its benchmark metrics: Acc, real / fake Acc, AP, AUC of the head
    (means over groups for per-group benchmarks, pooled for FakeClue and DMimage) and the text Acc."""
    head, text = metrics.get("head"), metrics.get("text")
    scored = [o for o in outputs if o["error"] is None and math.isfinite(o["p_fake"])]
    pooled = ranking_metrics([o["label"] for o in scored], [o["p_fake"] for o in scored], with_ap=True)
    nan = math.nan
    if kind == "fakeclue" or kind == "dmimage":
        acc_key = "acc" if kind == "fakeclue" else "overall_acc"
        row = {"acc": head[acc_key] if head else nan, "ap": pooled["ap"], "auc": pooled["auc"],
               "text_acc": text[acc_key] if text else nan, "averaging": "pooled over every image"}
    else:
        row = {"acc": head["mean_acc"] if head else nan, "ap": head.get("mean_ap", nan) if head else nan,
               "auc": head.get("mean_auc", nan) if head else nan, "text_acc": text["mean_acc"] if text else nan,
               "averaging": "Acc, AP, AUC: unweighted mean over groups; real / fake Acc: pooled"}
    row["real_acc"] = head["real_acc"] if head else nan
    row["fake_acc"] = head["fake_acc"] if head else nan
    row["n"] = len(scored)
    return row


def roc_curves_png(path: Path, curves: dict[str, tuple[list[float], list[int]]], title: str) -> Path:
    """Every detector's ROC curve (fake = positive) in one plot; detectors with one class scored are listed
    without a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(5.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for name, (scores, labels) in curves.items():
        if len(set(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.4f} over all images)")
        else:
            ax.plot([], [], label=f"{name} (ROC undefined: one class)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake called fake)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


_TABLE = (("detector", "name"), ("kind", "detector"), ("Acc", "acc"), ("real Acc", "real_acc"),
          ("fake Acc", "fake_acc"), ("AP", "ap"), ("AUC", "auc"), ("text Acc", "acc"), ("images/s", "images_per_s"),
          ("peak memory", "peak_memory"), ("n", "n"), ("reported", "reported"))


def comparison_table(rows: dict[str, dict[str, Any]], sources: list[str], title: str) -> str:
    """The Markdown comparison table (rates ×100), what its columns measure, and the numbered sources of the
    reported column."""
    keys = [key for _, key in _TABLE]
    cells = [[name, row["detector"], row["acc"], row["real_acc"], row["fake_acc"], row["ap"], row["auc"],
              row["text_acc"], row["images_per_s"], row["peak_memory"], row["n"], row["reported"]]
             for name, row in rows.items()]
    table = markdown_table([header for header, _ in _TABLE], cells, keys, title=title)
    averaging = next(iter(rows.values()))["averaging"]
    lines = [f"- Head p(fake) at 0.5; {averaging}. text Acc: verdicts parsed from the explanations.",
             "- images/s: images over the seconds spent in the detector (image decoding excluded); peak memory: "
             "while the detector was loaded and scored (CUDA allocator on a GPU, resident set on CPU)."]
    if sources:
        lines += ["- Reported (published figures on this split):", *(f"  [{i}] {s}" for i, s in enumerate(sources, 1))]
    else:
        lines.append("- Reported: no published figure for these detectors on this split.")
    return table + "\n" + "\n".join(lines) + "\n"


def run_compare(cfg: CompareConfig) -> dict | None:
    """Score every detector on the split (this process's shard), then, once every job is complete, write
    ``<out_dir>/<name>.{json,md}`` and ``<name>_roc.png``. Returns ``{detector name: row}``, or None while some
    shard of some detector is missing."""
    base = cfg.base
    kind = benchmark_name(base)
    benchmark = load_benchmark(base)
    runs = {entry.name: score_entry(entry, cfg, benchmark) for entry in cfg.detectors}
    if any(run.outputs is None for run, _ in runs.values()):
        logger.info("%s: waiting for other shards; the last one to finish writes the report", cfg.name)
        return None
    sources: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple[list[float], list[int]]] = {}
    for entry in cfg.detectors:
        run, digest = runs[entry.name]
        require_scorable(run.outputs, benchmark.invalid, f"compare {kind}: {entry.name}")
        metrics = benchmark_metrics(benchmark, run.outputs)
        perf = job_perf(run.work_dir, run.shard.count, digest)
        figures = reported_figures(entry.model.detector, base, benchmark)
        rows[entry.name] = {
            "detector": entry.model.detector, **detector_summary(kind, metrics, run.outputs),
            "images_per_s": perf["images_per_s"], "peak_memory": _memory_text(perf), "perf": perf,
            "reported": _reported_text(figures, sources),
            "reported_figures": [asdict(fig) for fig in figures], "metrics": metrics,
        }
        if cascade_lines(run.outputs):
            rows[entry.name]["cascade"] = cascade_metrics(run.outputs)
        scored = [o for o in run.outputs if o["error"] is None and math.isfinite(o["p_fake"])]
        curves[entry.name] = ([o["p_fake"] for o in scored], [o["label"] for o in scored])
    out_dir = Path(base.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roc = roc_curves_png(out_dir / f"{cfg.name}_roc.png", curves, f"{cfg.name}: ROC of every detector")
    table = comparison_table(rows, sources, f"{kind}: detectors compared")
    cascades = {name: row["cascade"] for name, row in rows.items() if "cascade" in row}
    tables = [table, cascade_table(cascades, f"{kind}: cascade decisions, stages and latency")] if cascades else [table]
    settings = {k: v for k, v in asdict(base).items() if k != "name"}
    provenance = run_provenance({**settings, "detectors": [to_dict(entry) for entry in cfg.detectors],
                                 "dataset": benchmark.summary(), "reported_sources": sources,
                                 "jobs": {name: run.fingerprint for name, (run, _) in runs.items()}},
                                seed=base.seed)
    headline = [f"{name}.{key}" for name in rows for key in ("acc", "auc")]
    paths = write_report(out_dir, cfg.name, rows, provenance, tables=tables, figures={"ROC curves": roc},
                         headline=headline)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return rows
