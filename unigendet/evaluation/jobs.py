"""Cross-dataset detection jobs (DMimage, ARForensics, and the image-folder layouts GenImage, UniversalFakeDetect,
DRCT-2M, DeepfakeBench) and the robustness job (any benchmark, metrics per JPEG / crop setting in one table).
Scoring goes through the sharded, resumable harness; reports are JSON + Markdown + PNG (per-group accuracy bars,
ROC of the head, robustness curves) with provenance.

DMimage is scored as its paper table (Real/Fake/Overall Acc and F1, per generator against all reals); every other
benchmark per group (ARForensics / GenImage / DRCT-2M generator, UFD subset, DeepfakeBench dataset): Acc, real
and fake Acc, AUC and AP per group, and the unweighted mean over groups. Each is scored twice from the same
outputs: from the detection head's p(fake) (threshold 0.5) and from the verdict parsed from the explanation
(``text``: unparsed excluded and counted; ``text_unparsed_as_wrong``). A detector without explanations gets the
head section only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from unigendet.config.loader import ConfigError
from unigendet.evaluation.benchmarks import (
    Benchmark,
    load_arforensics,
    load_deepfakebench,
    load_diffusionforensics,
    load_dmimage,
    load_drct2m,
    load_genimage,
    load_ufd,
)
from unigendet.evaluation.detectors import as_image_detector
from unigendet.evaluation.fakeclue import (
    FakeClueEvalConfig,
    fakeclue_scores,
    fakeclue_summary,
    job_identity,
    load_fakeclue_benchmark,
)
from unigendet.evaluation.harness import (
    NoScorableImagesError,
    ScoredRun,
    error_summary,
    require_scorable,
    score_benchmark,
)
from unigendet.evaluation.provenance import run_provenance
from unigendet.evaluation.robustness import PAPER_SETTINGS, parse_setting
from unigendet.inference.detect import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED
from unigendet.metrics.detection import (
    SIX_KEYS,
    arforensics_metrics,
    dmimage_metrics,
    head_predictions,
)
from unigendet.metrics.report import (
    bar_chart_png,
    curves_png,
    markdown_table,
    write_report,
)

logger = logging.getLogger(__name__)

MODES = ("head", "text", "text_unparsed_as_wrong")


DETECTION_BENCHMARKS = ("dmimage", "arforensics", "genimage", "ufd", "drct2m", "deepfakebench", "diffusionforensics")
# The split each layout benchmark is scored on by default (its test set), and the splits it has.
LAYOUT_SPLITS = {"genimage": ("val", ("train", "val")), "ufd": ("test", ("train", "val", "test")),
                 "drct2m": ("val", ("train", "val")), "deepfakebench": ("test", ("train", "val", "test")),
                 "diffusionforensics": ("test", ("train", "val", "test"))}
# Keys only some benchmarks read; setting one for another benchmark is an error.
_ONLY_FOR = {"split": tuple(LAYOUT_SPLITS), "real_root": ("drct2m",), "pair_reals": ("drct2m", "diffusionforensics"),
             "json_path": ("deepfakebench",), "compression": ("deepfakebench",),
             "frames_per_video": ("deepfakebench",)}


@dataclass
class DetectionEvalConfig:
    """A run of one image-folder benchmark (``benchmark``), with its labels as the benchmark's loader states them
    (:mod:`unigendet.evaluation.benchmarks`).

    ``root``: the DMimage test directory; the ARForensics root (or its ``test`` directory); the GenImage root
    (``<generator>/{train,val}/{ai,nature}``); the UniversalFakeDetect root (holding ``test/``, or the test folder);
    the DRCT-2M root (``MSCOCO/`` + ``DRCT-2M/<generator>/``); the DiffusionForensics ``images/`` folder (or its
    parent); DeepfakeBench's frames root (with ``json_path``, the
    dataset JSON or a folder of them). ``groups`` restricts the benchmark to some of its groups (ARForensics,
    GenImage and DRCT-2M generators, UFD subsets, DeepfakeBench datasets). ``split`` (layouts only): default the
    benchmark's test split (GenImage / DRCT-2M ``val``, UFD / DeepfakeBench ``test``). ``question``: asked about
    every image (None: the detector's default). A key that the benchmark does not read must stay unset.
    """

    benchmark: Literal["dmimage", "arforensics", "genimage", "ufd", "drct2m", "deepfakebench", "diffusionforensics"]
    root: str
    out_dir: str = "runs/eval"
    name: str | None = None  # report stem; default the benchmark name
    groups: list[str] | None = None  # score only these groups (not DMimage, whose folders are all scored)
    limit_per_group: int | None = None  # first N images per folder (per class folder / per label for layouts)
    split: str | None = None  # layouts: train / val / test (default the benchmark's test split)
    real_root: str | None = None  # DRCT-2M: the folder holding MSCOCO/ when it is not under root
    pair_reals: bool | None = None  # DRCT-2M (default true) / DiffusionForensics (default false): reals per generator
    json_path: str | None = None  # DeepfakeBench: the dataset JSON (or a folder of <dataset>.json files)
    compression: str | None = None  # DeepfakeBench: FaceForensics++ compression level (default c23)
    frames_per_video: int | None = None  # DeepfakeBench: frames spread evenly over each video (default all)
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = DEFAULT_SEED
    question: str | None = None
    setting: str = "none"
    perturb_seed: int = 0
    shard: str | None = None
    overwrite: bool = False
    gather_only: bool = False

    def __post_init__(self) -> None:
        if self.benchmark not in DETECTION_BENCHMARKS:
            raise ValueError(f"benchmark must be one of {list(DETECTION_BENCHMARKS)}, got {self.benchmark!r}")
        for key, benchmarks in _ONLY_FOR.items():
            if getattr(self, key) is not None and self.benchmark not in benchmarks:
                raise ValueError(f"{key} applies to {' / '.join(benchmarks)} only, not {self.benchmark}")
        if self.groups is not None and self.benchmark == "dmimage":
            raise ValueError("groups: DMimage scores every source folder of root (no group selection)")
        if self.benchmark in LAYOUT_SPLITS:
            default, known = LAYOUT_SPLITS[self.benchmark]
            self.split = self.split or default
            if self.split not in known:
                raise ValueError(f"split {self.split!r}: {self.benchmark} has {list(known)}")
        self.name = self.name or self.benchmark

    def validate(self) -> None:
        if self.benchmark == "deepfakebench" and self.json_path is None:
            raise ConfigError("json_path is required for deepfakebench (the dataset JSON; --json-path)")

    def input_paths(self, at: str) -> dict[str, str | None]:
        """The files and folders this run reads, by dotted key under ``at``."""
        return {f"{at}.root": self.root, f"{at}.real_root": self.real_root, f"{at}.json_path": self.json_path}


def load_detection_benchmark(cfg: DetectionEvalConfig) -> Benchmark:
    """The records ``cfg`` scores (its benchmark, split, groups and limit), with ``cfg.question`` set."""
    limit = cfg.limit_per_group
    if cfg.benchmark == "dmimage":
        benchmark = load_dmimage(cfg.root, limit)
    elif cfg.benchmark == "arforensics":
        benchmark = load_arforensics(cfg.root, cfg.groups, limit)
    elif cfg.benchmark == "genimage":
        benchmark = load_genimage(cfg.root, cfg.groups, cfg.split, limit)
    elif cfg.benchmark == "ufd":
        benchmark = load_ufd(cfg.root, cfg.groups, cfg.split, limit)
    elif cfg.benchmark == "diffusionforensics":
        benchmark = load_diffusionforensics(cfg.root, cfg.groups, cfg.split, limit, pair_reals=bool(cfg.pair_reals))
    elif cfg.benchmark == "drct2m":
        benchmark = load_drct2m(cfg.root, cfg.groups, cfg.split, limit, real_root=cfg.real_root,
                                pair_reals=cfg.pair_reals is not False)
    else:
        benchmark = load_deepfakebench(cfg.json_path, cfg.root, cfg.groups, cfg.split, limit,
                                       compression=cfg.compression or "c23", frames_per_video=cfg.frames_per_video)
    if cfg.question is not None:
        benchmark.records = [dataclasses.replace(r, question=cfg.question) for r in benchmark.records]
    return benchmark


# --------------------------------------------------------------------------------------------------
# Metrics from outputs


def detection_scores(benchmark: Benchmark, outputs: list[dict]) -> dict:
    """``{mode: metrics}`` for the modes the outputs support, plus ``errors``."""
    ok = [o for o in outputs if o["error"] is None]
    labels, groups = [o["label"] for o in ok], [o["group"] for o in ok]
    scores = [o["p_fake"] for o in ok]
    if benchmark.name == "dmimage":
        compute = dmimage_metrics
    else:
        def compute(y, p, g, unparsed="exclude", scores=None):
            return arforensics_metrics(y, p, g, unparsed, scores, generators=benchmark.groups)
    metrics: dict[str, Any] = {}
    if any(math.isfinite(s) for s in scores):
        metrics["head"] = compute(labels, head_predictions(scores), groups, "exclude", scores=scores)
        metrics["head"]["notes"].append("head: predicted fake when p_fake >= 0.5")
    if any(o["text"] is not None or o["text_label"] is not None for o in ok):
        text_labels = [o["text_label"] for o in ok]
        metrics["text"] = compute(labels, text_labels, groups, "exclude")
        metrics["text_unparsed_as_wrong"] = compute(labels, text_labels, groups, "wrong")
    metrics["errors"] = error_summary(outputs, benchmark.invalid)
    if not any(mode in metrics for mode in MODES):
        failed = f"{len(outputs) - len(ok)} of {len(outputs)} images failed: {metrics['errors']['by_reason']}"
        raise NoScorableImagesError(f"{benchmark.name}: nothing to score: no output has a p_fake or a text ({failed})")
    return metrics


def primary_mode(metrics: dict) -> str:
    """The mode the paper tables use for a VLM: the parsed text verdict when there is one, else the head."""
    return "text" if "text" in metrics else "head"


def detection_summary(benchmark: str, metrics: dict) -> dict[str, float]:
    """Headline numbers of one run (dotted keys into ``metrics``), e.g. for the robustness table."""
    keys = ("overall_acc", "overall_f1", "real_acc", "fake_acc") if benchmark == "dmimage" else ("mean_acc", "acc")
    return {f"{mode}.{k}": metrics[mode][k] for mode in ("text", "head") if mode in metrics for k in keys}


# --------------------------------------------------------------------------------------------------
# Markdown tables and plots


def _modes(metrics: dict) -> list[str]:
    return [m for m in MODES if m in metrics]


def dmimage_tables(metrics: dict) -> list[str]:
    header = ["mode", "Real Acc", "Real F1", "Fake Acc", "Fake F1", "Overall Acc", "Overall F1", "macro F1",
              "n", "unparsed"]
    keys = ["mode", *SIX_KEYS, "f1_macro", "n", "n_unparsed"]
    rows = [[mode, *(metrics[mode][k] for k in keys[1:])] for mode in _modes(metrics)]
    tables = [markdown_table(header, rows, keys, title="DMimage (paper layout)")]
    gen_keys = ["fake_acc", "fake_f1", "overall_acc", "overall_f1", "balanced_acc", "auc", "n_fake", "n_unparsed"]
    gen_header = ["generator", "Fake Acc", "Fake F1", "Overall Acc", "Overall F1", "balanced acc", "AUC", "n fake",
                  "unparsed"]
    for mode in _modes(metrics):
        per = metrics[mode]["per_generator"]
        rows = [[gen, *(v.get(k, math.nan) for k in gen_keys)] for gen, v in per.items()]
        mean = metrics[mode]["mean_over_generators"]
        rows.append(["**mean**", *(mean.get(k, math.nan) if not k.startswith("n_") else "" for k in gen_keys)])
        tables.append(markdown_table(gen_header, rows, ["generator", *gen_keys],
                                     title=f"{mode}: per generator (its fakes vs all real images)"))
        real = metrics[mode]["per_real_source"]
        if real:
            rows = [[src, v["real_acc"], v["real_f1"], v["n"], v["n_unparsed"]] for src, v in real.items()]
            tables.append(markdown_table(["real source", "Real Acc", "Real F1", "n", "unparsed"], rows,
                                         ["source", "real_acc", "real_f1", "n", "n_unparsed"],
                                         title=f"{mode}: per real source"))
    return tables


# How the reports name each per-group benchmark and its groups.
BENCHMARK_TITLES = {"arforensics": "ARForensics", "genimage": "GenImage", "ufd": "UniversalFakeDetect",
                    "drct2m": "DRCT-2M", "deepfakebench": "DeepfakeBench", "diffusionforensics": "DiffusionForensics"}
GROUP_NOUNS = {"ufd": "subset", "deepfakebench": "dataset"}


def group_noun(benchmark: str) -> str:
    """What one group of ``benchmark`` is: a generator (default), a UFD subset or a DeepfakeBench dataset."""
    return GROUP_NOUNS.get(benchmark, "generator")


def group_tables(benchmark: str, metrics: dict) -> list[str]:
    """Per-group benchmarks: accuracy per group and the mean (one row per mode), then Acc, real / fake Acc,
    AUC and AP per group for each mode, with their unweighted means."""
    modes = _modes(metrics)
    if not modes:
        return []
    noun = group_noun(benchmark)
    groups = metrics[modes[0]]["generators"]
    header = ["mode", *groups, "Mean"]
    rows = [[mode, *(metrics[mode]["per_generator"][g]["acc"] for g in groups), metrics[mode]["mean_acc"]]
            for mode in modes]
    title = ("ARForensics accuracy (paper layout)" if benchmark == "arforensics"
             else f"{BENCHMARK_TITLES[benchmark]} accuracy per {noun}")
    tables = [markdown_table(header, rows, ["mode", *(["acc"] * len(groups)), "mean_acc"], title=title)]
    detail_keys = ["acc", "real_acc", "fake_acc", "auc", "ap", "n", "n_unparsed"]
    mean_keys = {"acc": "mean_acc", "auc": "mean_auc", "ap": "mean_ap"}
    for mode in modes:
        rows = [[g, *(metrics[mode]["per_generator"][g].get(k, math.nan) for k in detail_keys)] for g in groups]
        rows.append(["**mean**", *(metrics[mode].get(mean_keys[k], math.nan) if k in mean_keys else ""
                                   for k in detail_keys)])
        tables.append(markdown_table([noun, "Acc", "Real Acc", "Fake Acc", "AUC", "AP", "n", "unparsed"], rows,
                                     [noun, *detail_keys], title=f"{mode}: per {noun}"))
    return tables


def _bar_charts(out_dir: Path, name: str, benchmark: str, metrics: dict) -> dict[str, Path]:
    figures = {}
    for mode in ("text", "head"):
        if mode not in metrics:
            continue
        colors = None
        if benchmark == "dmimage":
            values = {g: v["fake_acc"] for g, v in metrics[mode]["per_generator"].items()}
            real = {g: v["real_acc"] for g, v in metrics[mode]["per_real_source"].items()}
            values.update(real)
            colors = {g: "tab:green" for g in real}
            mean = metrics[mode]["mean_over_generators"]["fake_acc"]
            title = f"{name} {mode}: fake acc (blue), real acc (green)"
        else:
            values = {g: v["acc"] for g, v in metrics[mode]["per_generator"].items()}
            mean = metrics[mode]["mean_acc"]
            title = f"{name} ({mode}): accuracy per {group_noun(benchmark)}"
        path = out_dir / f"{name}_{mode}_per_generator.png"
        figures[f"per-generator accuracy ({mode})"] = bar_chart_png(path, values, title, mean=mean, colors=colors)
    return figures


def _headline(benchmark: str, metrics: dict) -> list[str]:
    mode = primary_mode(metrics)
    if benchmark == "dmimage":
        keys = [f"{mode}.{k}" for k in SIX_KEYS]
    else:
        keys = [f"{mode}.per_generator.{g}.acc" for g in metrics[mode]["generators"]] + [f"{mode}.mean_acc"]
    if mode != "head" and "head" in metrics:
        keys.append("head.overall_acc" if benchmark == "dmimage" else "head.mean_acc")
    return keys


def _roc_inputs(outputs: list[dict]) -> dict:
    scored = [o for o in outputs if o["error"] is None and math.isfinite(o["p_fake"])]
    return {"p_fake": [o["p_fake"] for o in scored], "labels": [o["label"] for o in scored]} if scored else {}


# --------------------------------------------------------------------------------------------------
# Jobs


def _scorer_and_identity(detector, cfg, decoding, model_path, benchmark: str):
    if detector is None:
        return None, None
    scorer = as_image_detector(detector, cfg.max_new_tokens, decoding, cfg.seed)
    return scorer, job_identity(benchmark, scorer, model_path)


def _score(scorer, identity, benchmark: Benchmark, cfg, setting: str) -> ScoredRun:
    return score_benchmark(scorer, benchmark.records, cfg.out_dir, cfg.name, identity, setting, cfg.perturb_seed,
                           cfg.batch_size, cfg.shard, cfg.overwrite, cfg.gather_only)


def _provenance(cfg, decoding, model_path, scorer, extra: dict, drop: tuple[str, ...] = ()) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in drop}
    settings.update(decoding=asdict(decoding) if decoding is not None else "greedy", **extra)
    return run_provenance(settings, model_path, getattr(scorer, "model", None), seed=cfg.seed)


def run_detection_eval(detector, cfg: DetectionEvalConfig, model_path: str | None = None,
                       decoding=None) -> dict | None:
    """One detection benchmark (``cfg.benchmark``): score (this shard), gather, write ``<out_dir>/<name>.{json,md}``
    + PNGs. Returns the metrics, or None while other shards are still missing."""
    benchmark = load_detection_benchmark(cfg)
    scorer, identity = _scorer_and_identity(detector, cfg, decoding, model_path, cfg.benchmark)
    run = _score(scorer, identity, benchmark, cfg, cfg.setting)
    if run.outputs is None:
        return None
    require_scorable(run.outputs, benchmark.invalid, f"{cfg.benchmark} {cfg.root}")
    metrics = detection_scores(benchmark, run.outputs)
    if metrics["errors"]["n_skipped"]:
        logger.warning("%d image(s) could not be scored: %s", metrics["errors"]["n_skipped"],
                       metrics["errors"]["by_reason"])
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = dmimage_tables(metrics) if cfg.benchmark == "dmimage" else group_tables(cfg.benchmark, metrics)
    provenance = _provenance(cfg, decoding, model_path, scorer,
                             {"dataset": benchmark.summary(), "job": run.fingerprint})
    paths = write_report(out_dir, cfg.name, metrics, provenance, **_roc_inputs(run.outputs), tables=tables,
                         figures=_bar_charts(out_dir, cfg.name, cfg.benchmark, metrics),
                         headline=_headline(cfg.benchmark, metrics))
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return metrics


@dataclass
class RobustnessConfig:
    """Robustness run: ``base`` (a FakeClue or detection benchmark config; its ``setting`` is ignored) scored
    under every setting of ``settings``; one report ``<base.out_dir>/<name>``."""

    base: FakeClueEvalConfig | DetectionEvalConfig
    settings: list[str] = field(default_factory=lambda: list(PAPER_SETTINGS))
    name: str | None = None

    def __post_init__(self) -> None:
        self.settings = [parse_setting(s).name for s in self.settings]
        if not self.settings:
            raise ValueError("robustness needs at least one setting")
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"duplicate robustness settings in {self.settings}")
        self.name = self.name or f"robustness_{benchmark_name(self.base)}"


def benchmark_name(cfg: FakeClueEvalConfig | DetectionEvalConfig) -> str:
    """The benchmark a FakeClue or detection config scores."""
    return "fakeclue" if isinstance(cfg, FakeClueEvalConfig) else cfg.benchmark


def load_benchmark(cfg: FakeClueEvalConfig | DetectionEvalConfig) -> Benchmark:
    """The records a FakeClue or detection config scores."""
    return load_fakeclue_benchmark(cfg) if isinstance(cfg, FakeClueEvalConfig) else load_detection_benchmark(cfg)


def benchmark_metrics(benchmark: Benchmark, outputs: list[dict]) -> dict:
    """The metrics of one scored run of ``benchmark``: the FakeClue protocol, or the detection modes."""
    if benchmark.name == "fakeclue":
        return fakeclue_scores(benchmark, outputs)
    return detection_scores(benchmark, outputs)


def _setting_summary(benchmark: str, metrics: dict) -> dict[str, float]:
    summary = fakeclue_summary(metrics) if benchmark == "fakeclue" else detection_summary(benchmark, metrics)
    summary["errors.n_skipped"] = metrics["errors"]["n_skipped"]
    return summary


def robustness_curves(out_path: Path, table: dict[str, dict[str, float]], title: str) -> Path | None:
    """Metric vs JPEG quality (``none`` drawn at quality 100) and vs crop ratio (``none`` at 1.0)."""
    jpeg, crop = "JPEG quality (none = 100)", "crop ratio (none = 1.0)"
    panels: dict[str, dict[str, list]] = {jpeg: {}, crop: {}}
    rate_keys = [k for k in next(iter(table.values())) if not k.rsplit(".", 1)[-1].startswith("n_")]
    for setting, row in table.items():
        pert = parse_setting(setting)
        targets = {"jpeg": [(jpeg, pert.value)], "crop": [(crop, pert.value)],
                   "none": [(jpeg, 100), (crop, 1.0)]}[pert.kind]
        for panel, x in targets:
            for key in rate_keys:
                panels[panel].setdefault(key, []).append((float(x), row.get(key, math.nan)))
    panels = {k: {s: sorted(pts) for s, pts in v.items()} for k, v in panels.items() if v}
    if not panels:
        return None
    return curves_png(out_path, panels, title)


def run_robustness_eval(detector, cfg: RobustnessConfig, model_path: str | None = None,
                        decoding=None) -> dict | None:
    """Score the base benchmark under every setting (each its own resumable, sharded job) and write one
    report: the metrics per setting, a table (one row per setting) and robustness curves. Returns
    ``{setting: metrics}``, or None while some shard of some setting is missing."""
    base = cfg.base
    kind = benchmark_name(base)
    benchmark = load_benchmark(base)
    scorer, identity = _scorer_and_identity(detector, base, decoding, model_path, kind)
    runs = {setting: _score(scorer, identity, benchmark, base, setting) for setting in cfg.settings}
    if any(run.outputs is None for run in runs.values()):
        return None
    for setting, run in runs.items():
        require_scorable(run.outputs, benchmark.invalid, f"robustness {kind} ({setting})")
    per_setting = {setting: benchmark_metrics(benchmark, run.outputs) for setting, run in runs.items()}
    table = {setting: _setting_summary(kind, m) for setting, m in per_setting.items()}
    columns = list(dict.fromkeys(k for row in table.values() for k in row))
    rows = [[setting, *(row.get(k, math.nan) for k in columns)] for setting, row in table.items()]
    md = markdown_table(["setting", *columns], rows, ["setting", *columns], title=f"{kind}: metrics per setting")
    out_dir = Path(base.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = robustness_curves(out_dir / f"{cfg.name}_curves.png", table, f"{cfg.name}")
    provenance = _provenance(base, decoding, model_path, scorer, {
        "settings": cfg.settings, "dataset": benchmark.summary(),
        "jobs": {setting: run.fingerprint for setting, run in runs.items()}}, drop=("setting",))
    headline = [f"{setting}.{k}" for setting in cfg.settings for k in columns[:1]]
    paths = write_report(out_dir, cfg.name, per_setting, provenance, tables=[md],
                         figures={"robustness curves": curves} if curves else None, headline=headline)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return per_setting
