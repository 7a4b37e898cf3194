"""The model commands of the command line (``detect``, ``generate``, ``eval ...``): one config dataclass and
one run function each.

A command's config is composed of component configs: the model to load (:class:`ModelSource`; for the commands
that score images :class:`~unigendet.evaluation.detectors.DetectorSource`, which also names the detector:
``model.detector: unigendet`` or a saved baseline such as ``ltd``), how our model reads images
(:class:`DetectorOptions`), decoding or sampler settings, and the job's own config
(:class:`~unigendet.evaluation.fakeclue.FakeClueEvalConfig`, :class:`~unigendet.evaluation.fid.FIDConfig`, ...).
``check_inputs()`` checks that the files a run reads exist, without loading anything heavy. A run function
returns what the command prints (a mapping is printed as JSON); the process that completes the last shard of a
sharded job returns the metrics, the others None.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from unigendet.cascade.calibration import CalibrationTargets
from unigendet.cascade.config import CascadeConfig
from unigendet.config.loader import ConfigError, MissingKeyError, to_dict
from unigendet.evaluation.compare import CompareConfig, run_compare
from unigendet.evaluation.detectors import (
    DetectorSource,
    ImageDetector,
    baseline_options_unset,
    load_image_detector,
)
from unigendet.evaluation.diversity import DiversityConfig, run_diversity, run_diversity_generation
from unigendet.evaluation.fakeclue import FakeClueEvalConfig, run_fakeclue_eval
from unigendet.evaluation.fid import FIDConfig, run_fid, run_fid_generation
from unigendet.evaluation.geneval import (
    GenEvalConfig,
    run_geneval_generation,
    run_geneval_scoring,
    run_geneval_summary,
)
from unigendet.evaluation.harness import ShardSpec, resolve_shard
from unigendet.evaluation.image_generation import GenerationSettings
from unigendet.evaluation.jobs import DetectionEvalConfig, RobustnessConfig, run_detection_eval, run_robustness_eval
from unigendet.evaluation.prompts import PromptSelection
from unigendet.inference.detect import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DecodingConfig
from unigendet.inference.generate import SamplerSettings
from unigendet.inference.loading import DetectorOptions, ModelSource, require_paths

logger = logging.getLogger(__name__)

Stage = Literal["generate", "score", "all"]


# --------------------------------------------------------------------------------------------------
# Components shared by the commands


def check_detector_choice(model: DetectorSource, options: DetectorOptions) -> None:
    """A baseline detector takes none of UniGenDet's preprocessing choices (``detector.*``)."""
    if not model.is_unigendet:
        baseline_options_unset(options)


def generation_shard(shard: str | None, single_process: bool) -> ShardSpec:
    """The shard this process generates (``shard``, else RANK/WORLD_SIZE); ``single_process`` forbids several."""
    try:
        spec = resolve_shard(shard)
    except ValueError as err:
        raise ConfigError(f"shard: {err}") from err
    if single_process and spec.count > 1:
        raise ConfigError("stage all runs in one process; with several shards run stage generate on each, "
                          "then stage score")
    return spec


# --------------------------------------------------------------------------------------------------
# detect / generate


@dataclass
class DetectCommand:
    """``detect``: the detection head's verdict and the explanation for each image (a baseline detector,
    ``model.detector``, gives its p(fake) and verdict only)."""

    images: list[str]
    model: DetectorSource
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    question: str | None = None  # text after <image> in the human turn; default the detector's
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED  # combined with each image's pixels: its VAE posterior sample and token sampling
    json: bool = False  # print a JSON list instead of text

    def validate(self) -> None:
        if not self.images:
            raise MissingKeyError(["images"])
        check_detector_choice(self.model, self.detector)

    def check_inputs(self) -> None:
        self.model.check_inputs()
        require_paths({f"images[{i}]": path for i, path in enumerate(self.images)})


def run_detect_command(cfg: DetectCommand) -> list[dict] | str:
    from unigendet.data.images import load_image_file
    from unigendet.data.quality import BadSample

    images = []
    for path in cfg.images:
        try:
            images.append(load_image_file(path))
        except BadSample as bad:
            raise ConfigError(f"cannot read {path}: {bad}") from bad
    detector = load_image_detector(cfg.model, cfg.detector, max_new_tokens=cfg.max_new_tokens,
                                   decoding=cfg.decoding, seed=cfg.seed, batch_size=cfg.batch_size)
    results = []
    for start in range(0, len(images), cfg.batch_size):
        batch = images[start : start + cfg.batch_size]
        results += detector.score(batch, [cfg.question] * len(batch))
    records = [{"image": path, **result.record()} for path, result in zip(cfg.images, results)]
    if cfg.json:
        return records
    lines = []
    for rec in records:
        p_fake = "n/a" if rec["p_fake"] is None else f"{rec['p_fake']:.4f}"
        explanation = "" if rec["explanation"] is None else f"\n  {rec['explanation']}"
        decision = f"\t{rec['decision']} at {rec['stage_exited']}" if "decision" in rec else ""  # a cascade's
        lines.append(f"{rec['image']}\t{rec['label']}\tp_fake={p_fake}{decision}{explanation}")
    return "\n".join(lines)


@dataclass
class GenerateCommand:
    """``generate``: text-to-image, one PNG per prompt, plus ``generations.json`` (settings, seeds)."""

    prompts: list[str]
    model: ModelSource
    out: str  # output directory
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    height: int | None = None  # px, a multiple of 16; default min(1024, the model's largest image)
    width: int | None = None
    seed: int = 0  # prompt i uses seed + i
    batch_size: int = 4

    def validate(self) -> None:
        if not self.prompts:
            raise MissingKeyError(["prompts"])

    def check_inputs(self) -> None:
        self.model.check_inputs()


def run_generate_command(cfg: GenerateCommand) -> str:
    generator = cfg.model.load_generator()
    geometry = generator.model.config
    side = min(1024, geometry.latent_downsample * geometry.max_latent_size)
    height, width = cfg.height or side, cfg.width or side
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for start in range(0, len(cfg.prompts), cfg.batch_size):
        prompts = cfg.prompts[start : start + cfg.batch_size]
        seeds = [cfg.seed + start + i for i in range(len(prompts))]
        images = generator.generate(prompts, height=height, width=width, seed=seeds, settings=cfg.sampler)
        for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
            path = out / f"{start + i:04d}_{slug}.png"
            image.save(path)
            manifest.append({"file": path.name, "prompt": prompt, "seed": seed, "height": height, "width": width})
    settings = {k: v for k, v in to_dict(cfg).items() if k != "prompts"}
    (out / "generations.json").write_text(json.dumps({"settings": settings, "images": manifest}, indent=2))
    return "\n".join(str(out / m["file"]) for m in manifest)


# --------------------------------------------------------------------------------------------------
# Detection benchmarks: FakeClue, DMimage, ARForensics, the image-folder layouts, robustness, comparison.
# Each scores with the detector ``model`` names (UniGenDet, or a saved baseline that gives p(fake) only).


class ScoringCommand:
    """What the detection scoring commands share: ``model`` names the detector, ``detector`` and ``decoding``
    tune it, and ``split()`` gives the job's split config and its key. The split's files must exist, and the
    model's too unless the run only gathers finished shards (gathering reads the shards, not the model)."""

    def split(self) -> tuple[FakeClueEvalConfig | DetectionEvalConfig, str]:
        raise TypeError(f"{type(self).__name__} must say which section holds its split")

    def validate(self) -> None:
        check_detector_choice(self.model, self.detector)

    def check_inputs(self) -> None:
        job, key = self.split()
        check_split_inputs(job, key)
        if not job.gather_only:
            self.model.check_inputs()

    def scorer(self) -> ImageDetector | None:
        """The detector this command scores with (None when it only gathers finished shards)."""
        job = self.split()[0]
        if job.gather_only:
            return None
        return load_image_detector(self.model, self.detector, max_new_tokens=job.max_new_tokens,
                                   decoding=self.decoding, seed=job.seed, batch_size=job.batch_size)


@dataclass
class FakeClueCommand(ScoringCommand):
    """``eval fakeclue``: the FakeClue protocol (Acc, F1, ROUGE-L, CSS from the text; Acc, F1, AUC from the head)."""

    model: DetectorSource
    fakeclue: FakeClueEvalConfig
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def split(self) -> tuple[FakeClueEvalConfig, str]:
        return self.fakeclue, "fakeclue"


def run_fakeclue_command(cfg: FakeClueCommand) -> dict | None:
    return run_fakeclue_eval(cfg.scorer(), cfg.fakeclue, model_path=cfg.model.path,
                             decoding=cfg.decoding)


@dataclass
class DetectionCommand(ScoringCommand):
    """``eval dmimage`` / ``arforensics`` / ``genimage`` / ``ufd`` / ``drct2m`` / ``deepfakebench``: DMimage's
    table, or accuracy, AUC and AP per group, from the head and from the parsed text."""

    model: DetectorSource
    detection: DetectionEvalConfig
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def split(self) -> tuple[DetectionEvalConfig, str]:
        return self.detection, "detection"


def run_detection_command(cfg: DetectionCommand) -> dict | None:
    return run_detection_eval(cfg.scorer(), cfg.detection, model_path=cfg.model.path,
                              decoding=cfg.decoding)


@dataclass
class RobustnessCommand(ScoringCommand):
    """``eval robustness``: one benchmark scored under every JPEG / crop setting, in one table with curves."""

    model: DetectorSource
    robustness: RobustnessConfig
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def split(self) -> tuple[FakeClueEvalConfig | DetectionEvalConfig, str]:
        return self.robustness.base, "robustness.base"


def run_robustness_command(cfg: RobustnessCommand) -> dict | None:
    return run_robustness_eval(cfg.scorer(), cfg.robustness, model_path=cfg.model.path,
                               decoding=cfg.decoding)


def check_split_inputs(base: FakeClueEvalConfig | DetectionEvalConfig, at: str) -> None:
    """ConfigError naming the key of the first file or folder the split reads that does not exist."""
    if isinstance(base, FakeClueEvalConfig):
        require_paths({f"{at}.json_path": base.json_path, f"{at}.image_root": base.image_root})
    else:
        require_paths(base.input_paths(at))


@dataclass
class CompareCommand:
    """``eval compare``: every detector of ``compare.detectors`` on the split ``compare.base`` names, one table
    (Acc, real / fake Acc, AP, AUC, images/s, peak memory, published figures) and one ROC plot."""

    compare: CompareConfig

    def check_inputs(self) -> None:
        check_split_inputs(self.compare.base, "compare.base")
        if self.compare.base.gather_only:
            return
        for i, entry in enumerate(self.compare.detectors):
            entry.model.check_inputs(f"compare.detectors[{i}].model")


def run_compare_command(cfg: CompareCommand) -> dict | None:
    return run_compare(cfg.compare)


@dataclass
class CascadeCommand:
    """``cascade``: write a cascade directory ``out`` (``cascade.json``) from saved stages and thresholds; with a
    ``validation`` split (FakeClue or any detection benchmark, labels as its loader states them), first choose the
    thresholds there to meet the ``calibration`` targets and save the record of the rates achieved.
    ``copy_stages``: copy the stage-1 and spectral detector directories into ``out``."""

    out: str
    cascade: CascadeConfig
    validation: FakeClueEvalConfig | DetectionEvalConfig | None = None
    calibration: CalibrationTargets = field(default_factory=CalibrationTargets)
    copy_stages: bool = False

    def check_inputs(self) -> None:
        self.cascade.check_inputs("cascade")
        if self.validation is not None:
            check_split_inputs(self.validation, "validation")


def run_cascade_command(cfg: CascadeCommand) -> dict:
    from unigendet.cascade.calibration import calibrate
    from unigendet.cascade.storage import build_cascade, save_cascade
    from unigendet.data.images import load_image_file
    from unigendet.data.quality import BadSample
    from unigendet.evaluation.jobs import load_benchmark

    config, record = cfg.cascade, None
    if cfg.validation is not None:
        benchmark = load_benchmark(cfg.validation)
        if not benchmark.records:
            raise ConfigError("validation: the split holds no image to calibrate on")

        def load(i: int):
            try:
                return load_image_file(benchmark.records[i].path)
            except BadSample as bad:
                raise ConfigError(f"validation: cannot read {benchmark.records[i].path}: {bad}") from None

        thresholds, record = calibrate(build_cascade(config), load, [r.label for r in benchmark.records],
                                       cfg.calibration, batch_size=config.batch_size)
        record["validation"] = benchmark.summary()
        config = replace(config, thresholds=thresholds)
    path = save_cascade(cfg.out, config, record, copy_stages=cfg.copy_stages)
    return {"cascade": str(path.parent), "thresholds": asdict(config.thresholds), "calibration": record}


@dataclass
class MergeCommand:
    """``eval merge``: one Markdown table from several JSON reports."""

    reports: list[str]
    out: str | None = None  # also write the table to this file
    columns: list[str] | None = None  # dotted metric keys; default each report's headline

    def check_inputs(self) -> None:
        require_paths({f"reports[{i}]": path for i, path in enumerate(self.reports)})


def run_merge_command(cfg: MergeCommand) -> str:
    from unigendet.metrics import merge_reports

    table = merge_reports(cfg.reports, columns=cfg.columns)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(table, encoding="utf-8")
    return table.rstrip("\n")


# --------------------------------------------------------------------------------------------------
# Generation benchmarks: FID, GenEval, diversity. Generation is sharded (``shard: I/N``, or RANK/WORLD_SIZE)
# and resumable; scoring runs in one process once every shard has finished.


def _check_prompt_table(selection: PromptSelection) -> None:
    require_paths({f"prompts.table.data_files[{i}]": f for i, f in enumerate(selection.table.data_files)})


@dataclass
class FIDCommand:
    """``eval fid``: generate one image per held-out prompt (stage generate, on every shard), then the FID against
    the prompts' real images (stage score); stage all does both in one process."""

    model: ModelSource
    fid: FIDConfig
    stage: Stage = "all"
    prompts: PromptSelection = field(default_factory=PromptSelection)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    shard: str | None = None  # "I/N": generate shard I of N (default RANK/WORLD_SIZE, else everything)

    def validate(self) -> None:
        if self.stage != "score" and not self.prompts.table.data_files:
            raise MissingKeyError(["prompts.table.data_files"])

    def check_inputs(self) -> None:
        if self.stage != "score":
            self.model.check_inputs()
            _check_prompt_table(self.prompts)
            generation_shard(self.shard, single_process=self.stage == "all")
        if self.stage != "generate":
            from unigendet.metrics.fid import require_inception_weights

            require_inception_weights(self.fid.inception_weights)  # before hours of generation, not after


def run_fid_command(cfg: FIDCommand) -> dict | None:
    if cfg.stage != "score":
        shard = generation_shard(cfg.shard, single_process=cfg.stage == "all")
        counts = run_fid_generation(cfg.model.load_generator(), cfg.prompts, cfg.fid.gen_dir, cfg.generation, shard,
                                    model_path=cfg.model.path)
        if cfg.stage == "generate":
            return counts
        logger.info("generated: %s", counts)
    return run_fid(cfg.fid, model_path=cfg.model.path)


@dataclass
class GenEvalCommand:
    """``eval geneval``: generate 4 images per GenEval prompt (stage generate), score them with the approximate
    transformers backend (stage score), or summarise a GenEval results.jsonl (stage summarise)."""

    model: ModelSource
    stage: Literal["generate", "score", "summarise"]
    geneval: GenEvalConfig
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    shard: str | None = None

    def validate(self) -> None:
        needed = {"generate": ("metadata_file", "prompt_set"), "score": ("detector_dir", "clip_dir"),
                  "summarise": ("results",)}[self.stage]
        missing = [f"geneval.{name}" for name in needed if getattr(self.geneval, name) is None]
        if missing:
            raise MissingKeyError(missing)

    def check_inputs(self) -> None:
        g = self.geneval
        if self.stage == "generate":
            self.model.check_inputs()
            require_paths({"geneval.metadata_file": g.metadata_file})
            generation_shard(self.shard, single_process=False)
        elif self.stage == "score":
            require_paths({"geneval.gen_dir": g.gen_dir, "geneval.detector_dir": g.detector_dir,
                           "geneval.clip_dir": g.clip_dir})
        else:
            require_paths({"geneval.results": g.results})


def run_geneval_command(cfg: GenEvalCommand) -> dict:
    g = cfg.geneval
    if cfg.stage == "generate":
        return run_geneval_generation(cfg.model.load_generator(), g.metadata_file, g.prompt_set, g.gen_dir,
                                      cfg.generation, samples=g.samples,
                                      shard=generation_shard(cfg.shard, single_process=False),
                                      model_path=cfg.model.path)
    if cfg.stage == "score":
        return run_geneval_scoring(g, model_path=cfg.model.path)
    return run_geneval_summary(g, model_path=cfg.model.path)


def _diversity_prompts() -> PromptSelection:
    # Diversity draws K samples per prompt, so it uses fewer prompts than FID (one image per prompt).
    return PromptSelection(limit=500)


@dataclass
class DiversityCommand:
    """``eval diversity``: K samples per held-out prompt (stage generate), then intra-prompt LPIPS and CLIP
    similarity (stage score); stage all does both in one process."""

    model: ModelSource
    diversity: DiversityConfig
    stage: Stage = "all"
    samples: int = 16  # samples per prompt; sample k uses seed + k
    prompts: PromptSelection = field(default_factory=_diversity_prompts)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    shard: str | None = None

    def validate(self) -> None:
        if self.stage != "score" and not self.prompts.table.data_files:
            raise MissingKeyError(["prompts.table.data_files"])

    def check_inputs(self) -> None:
        d = self.diversity
        if self.stage != "score":
            self.model.check_inputs()
            _check_prompt_table(self.prompts)
            generation_shard(self.shard, single_process=self.stage == "all")
        if self.stage != "generate":
            if d.lpips_alexnet is None and d.lpips_lin is None and d.clip_dir is None:
                raise ConfigError("scoring needs diversity.lpips_alexnet + diversity.lpips_lin and/or "
                                  "diversity.clip_dir")
            require_paths({"diversity.lpips_alexnet": d.lpips_alexnet, "diversity.lpips_lin": d.lpips_lin,
                           "diversity.clip_dir": d.clip_dir})


def run_diversity_command(cfg: DiversityCommand) -> dict | None:
    if cfg.stage != "score":
        shard = generation_shard(cfg.shard, single_process=cfg.stage == "all")
        counts = run_diversity_generation(cfg.model.load_generator(), cfg.prompts, cfg.diversity.gen_dir, cfg.samples,
                                          cfg.generation, shard, model_path=cfg.model.path)
        if cfg.stage == "generate":
            return counts
        logger.info("generated: %s", counts)
    return run_diversity(cfg.diversity, model_path=cfg.model.path)
