"""The co-evolution driver: ``rounds`` rounds of GDUF -> DIGA -> generate -> measure.

Round r writes under ``<out_dir>/round<r>/``: ``gduf/`` and ``diga/`` (training runs; ``final/`` is each one's
export), ``generated/`` (one folder per prompt image, the evaluation harness's layout), ``reals/`` (as many real
images, when a real table is configured) and ``detection.json`` (both as FakeClue entries: the generated images
labelled fake, the reals real). Round r+1's GDUF starts from round r's DIGA export and adds every earlier round's
``detection.json`` to its detection data, so the detector trains against its own generator's output; its DIGA then
aligns the generator to that new detector.

Every stage is resumable: a training stage that finished leaves ``final/stage_done.json`` and is skipped on a
rerun (an interrupted one resumes from its last checkpoint through the trainer's own ``resume: auto``); generation
skips the prompts whose images exist. Under a multi-rank launch the training stages run on every rank through
DeepSpeed, generation is sharded round-robin across ranks, and rank 0 writes the JSON files and the report, with
barriers between stages.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from unigendet.coevolution.config import CoevolutionConfig, PromptSetConfig
from unigendet.distributed.core import (
    barrier,
    init_process_group,
    is_main_process,
    rank,
    slurm_rank_environment,
    world_size,
)
from unigendet.evaluation.fid import generate_fid_images
from unigendet.evaluation.harness import ShardSpec
from unigendet.evaluation.image_generation import IMAGE_NAME, folder_name
from unigendet.evaluation.prompts import EvalPrompt
from unigendet.labels import FAKECLUE_FAKE, FAKECLUE_REAL

logger = logging.getLogger(__name__)

STAGE_DONE = "stage_done.json"
DETECTION_JSON = "detection.json"
DEFAULT_QUESTION = "<image>\nIs this image real or fake? Explain your reasoning."


@dataclass(frozen=True)
class RoundPaths:
    """Where round ``index`` (1-based) keeps its runs, images and fake entries."""

    index: int
    root: Path

    @classmethod
    def of(cls, out_dir: str | Path, index: int) -> RoundPaths:
        return cls(index, Path(out_dir) / f"round{index}")

    @property
    def gduf(self) -> Path:
        return self.root / "gduf"

    @property
    def diga(self) -> Path:
        return self.root / "diga"

    @property
    def generated(self) -> Path:
        return self.root / "generated"

    @property
    def reals(self) -> Path:
        return self.root / "reals"

    @property
    def detection_json(self) -> Path:
        return self.root / DETECTION_JSON

    @property
    def detector(self) -> Path:
        """The round's detector: its GDUF export (DIGA's frozen teacher)."""
        return self.gduf / "final"

    @property
    def generator(self) -> Path:
        """The round's generator: its DIGA export."""
        return self.diga / "final"


# --------------------------------------------------------------------------------------------------
# Prompts


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a prompt table in JSON must be a list of objects")
    return rows


@dataclass(frozen=True)
class PromptSet:
    """The evaluation-harness prompts of a round and the group each one depicts (None without a group column)."""

    prompts: list[EvalPrompt]
    groups: list[str | None]


def load_prompt_set(cfg: PromptSetConfig) -> PromptSet:
    """Captions of ``cfg``'s tables in order (first ``limit``), each repeated ``per_prompt`` times with its own
    index, hence its own seed in the generation harness."""
    rows: list[dict] = []
    for name in cfg.data_files:
        rows += _read_table(Path(name))
    rows = rows[: cfg.limit] if cfg.limit else rows
    missing = [c for c in (cfg.caption_column, cfg.group_column) if c and rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"prompt tables {cfg.data_files}: " + ("no rows" if not rows else f"no column {missing}"))
    prompts, groups = [], []
    for row_index, row in enumerate(rows):
        for k in range(cfg.per_prompt):
            prompts.append(EvalPrompt(index=len(prompts), key=f"prompt{row_index:05d}-{k}",
                                      prompt=str(row[cfg.caption_column]), image_path=None,
                                      source_index=row_index))
            groups.append(None if cfg.group_column is None else str(row[cfg.group_column]))
    return PromptSet(prompts, groups)


def prompt_images(folder: Path, prompts: list[EvalPrompt]) -> list[Image.Image]:
    """The images the generation harness drew into ``folder``, in prompt order (every prompt must be done)."""
    files = [Path(folder) / folder_name(p) / IMAGE_NAME for p in prompts]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} generated image(s) missing, e.g. {missing[0]}")
    return [Image.open(f).convert("RGB") for f in files]


def round_images(paths: RoundPaths, prompts: list[EvalPrompt]) -> list[Image.Image]:
    """The images round ``paths.index``'s generator drew, in prompt order."""
    return prompt_images(paths.generated, prompts)


# --------------------------------------------------------------------------------------------------
# Stages


def stage_done(run_dir: Path) -> dict | None:
    marker = run_dir / "final" / STAGE_DONE
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def _loss_span(history: list[dict], key: str) -> list[float] | None:
    logged = [h[key] for h in history if key in h]
    return [logged[0], logged[-1]] if logged else None


def train_stage(recipe: str, overrides: list[str], run_dir: Path) -> dict:
    """Train ``recipe`` into ``run_dir`` unless it finished before; returns its record (steps, first/last losses)."""
    done = stage_done(run_dir)
    if done is not None:
        logger.info("co-evolution: %s finished before, skipped", run_dir)
        return done
    from unigendet.training.config import load_train_config
    from unigendet.training.trainer import Trainer

    cfg = load_train_config(recipe, [*overrides, f"checkpoint.dir={run_dir}"])
    start = time.perf_counter()
    state = Trainer(cfg).train()
    record = {"recipe": recipe, "overrides": overrides, "steps": cfg.total_steps,
              "seconds": time.perf_counter() - start,
              **{key: _loss_span(state.history, key) for key in ("loss", "mse", "align", "det", "ce")}}
    if is_main_process():
        (run_dir / "final" / STAGE_DONE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    barrier()
    return record


def _fake_source_overrides(paths: RoundPaths, weight: float) -> list[str]:
    prefix = f"data.sources.round{paths.index}_images"
    return [f"{prefix}.kind=fakeclue", f"{prefix}.json_path={paths.detection_json}",
            f"{prefix}.image_root={paths.root}", f"{prefix}.weight={weight}"]


def gduf_overrides(cfg: CoevolutionConfig, index: int) -> list[str]:
    """Round ``index``'s GDUF overrides: round 1 runs the recipe as configured; later rounds continue from the
    previous round's generator with every earlier round's fakes added to the detection data."""
    overrides = list(cfg.gduf_overrides)
    if index == 1:
        return overrides
    previous = RoundPaths.of(cfg.out_dir, index - 1)
    overrides += ["init.kind=unigendet", f"init.path={previous.generator}", "init.tokenizer=null"]
    if cfg.later_gduf_steps is not None:
        overrides.append(f"total_steps={cfg.later_gduf_steps}")
    overrides += cfg.later_gduf_overrides
    for earlier in range(1, index):
        overrides += _fake_source_overrides(RoundPaths.of(cfg.out_dir, earlier), cfg.fake_weight)
    return overrides


def generate_round(paths: RoundPaths, prompt_set: PromptSet, cfg: CoevolutionConfig) -> float:
    """This rank's shard of the round generator's images (missing ones only), then every rank waits; returns the
    seconds this rank spent."""
    from unigendet.inference.loading import build_generator, resolve_device

    start = time.perf_counter()
    shard = ShardSpec(rank(), world_size())
    todo = [p for p in prompt_set.prompts if shard.owns(p.index)
            and not (paths.generated / folder_name(p) / "metadata.json").is_file()]
    if todo:
        generator = build_generator(paths.generator, device=resolve_device(None))
        generate_fid_images(generator, prompt_set.prompts, paths.generated, cfg.generation, shard)
    barrier()
    return time.perf_counter() - start


def _entry(image: str, label: int, cate: str, question: str, answer: str) -> dict:
    return {"image": image, "label": label, "cate": cate,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _write_paired_reals(paths: RoundPaths, cfg: CoevolutionConfig, count: int, rng: random.Random) -> list[str]:
    """``count`` real images from ``cfg.real_table`` (a seeded shuffle, cycled when the table is shorter) written
    as PNGs under ``paths.reals``; returns their paths relative to the round folder."""
    import io

    rows = _read_table(Path(cfg.real_table))
    if not rows or cfg.real_image_column not in rows[0]:
        raise ValueError(f"real_table {cfg.real_table}: needs rows with a {cfg.real_image_column!r} column")
    order = list(range(len(rows)))
    rng.shuffle(order)
    paths.reals.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(count):
        cell = rows[order[k % len(order)]][cfg.real_image_column]
        source = io.BytesIO(cell) if isinstance(cell, bytes) else Path(cfg.real_table).parent / str(cell)
        name = f"reals/{k:05d}.png"
        Image.open(source).convert("RGB").save(paths.root / name)
        names.append(name)
    return names


def write_detection_json(paths: RoundPaths, prompt_set: PromptSet, cfg: CoevolutionConfig, question: str) -> int:
    """The round's generated images as FakeClue entries labelled fake, plus as many paired reals labelled real when
    ``cfg.real_table`` is set; answers drawn with a seeded generator. Returns the number of entries."""
    rng = random.Random(cfg.seed * 1_000_003 + paths.index)
    cate = f"round{paths.index}"
    entries = [_entry(f"generated/{folder_name(p)}/{IMAGE_NAME}", FAKECLUE_FAKE, cate, question,
                      rng.choice(cfg.fake_answers)) for p in prompt_set.prompts]
    if is_main_process():
        if cfg.real_table:
            for name in _write_paired_reals(paths, cfg, len(entries), rng):
                entries.append(_entry(name, FAKECLUE_REAL, cate, question, rng.choice(cfg.real_answers)))
        paths.detection_json.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    barrier()
    return len(prompt_set.prompts) * (2 if cfg.real_table else 1)


# --------------------------------------------------------------------------------------------------
# The run


def join_ranks(env=None) -> None:
    """Under a multi-rank launch, join the process group before any stage: a resumed run may skip every training
    stage, which would otherwise be what initialises it, and generation and the barriers need it."""
    import torch

    env = dict(os.environ if env is None else env)
    env.update(slurm_rank_environment(env))
    if int(env.get("WORLD_SIZE", "1")) > 1:
        init_process_group("cuda" if torch.cuda.is_available() else "cpu")


def run_coevolution(cfg: CoevolutionConfig, question: str = DEFAULT_QUESTION) -> list[dict]:
    """Run (or resume) every round; returns the per-round records, also written by rank 0 as
    ``coevolution.json``, ``coevolution.md`` and ``coevolution.png`` in ``out_dir``."""
    from unigendet.coevolution.report import measure_round, write_report

    cfg.validate()
    join_ranks()
    prompt_set = load_prompt_set(cfg.prompts)
    records = []
    for index in range(1, cfg.rounds + 1):
        paths = RoundPaths.of(cfg.out_dir, index)
        logger.info("co-evolution round %d / %d in %s", index, cfg.rounds, paths.root)
        gduf = train_stage(cfg.gduf, gduf_overrides(cfg, index), paths.gduf)
        diga = train_stage(cfg.diga, [*cfg.diga_overrides, f"init.path={paths.detector}"], paths.diga)
        generation_seconds = generate_round(paths, prompt_set, cfg)
        write_detection_json(paths, prompt_set, cfg, question)
        if is_main_process():
            start = time.perf_counter()
            measured = measure_round(cfg, index, prompt_set)
            records.append({"round": index, "gduf": gduf, "diga": diga, **measured,
                            "seconds": {"gduf": gduf.get("seconds"), "diga": diga.get("seconds"),
                                        "generation": generation_seconds,
                                        "measure": time.perf_counter() - start}})
            write_report(records, Path(cfg.out_dir))
        barrier()
    return records
