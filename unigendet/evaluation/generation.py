"""FID on held-out prompts (design doc §5): choose prompts, generate (sharded, resumable), score with the FID
Inception against the real images paired with the prompts.

Prompt choice. Prompts are read from the same tables the training loader reads (LAION ``final_metadata.json``
with ``image_path`` + ``prompt``, parquet shards, …) *through* :class:`~unigendet.data.sources.TextToImageSource`,
so every row has the training loader's record key (``f"{file basename}:{row}"``, or the ``key_column`` value).
Two rules:

* ``heldout`` (default): the rows that :func:`~unigendet.data.sources.heldout` puts on the held-out side for the
  given fraction and salt — exactly the rows a training run with ``split: train`` and the same
  ``heldout_fraction`` / ``heldout_salt`` never sees (salted SHA-1 of the key; independent of row order, machine
  and Python version). Use the *same data files and key column* as the training recipe, or the keys differ;
* ``official_slice``: positional rows ``[10000:15000]`` of the table, the official script's choice. Its list order
  comes from ``os.listdir`` on the machine that built the file, so it is neither reproducible nor provably disjoint
  from training; reports label it as such.

The first ``limit`` chosen rows in table order are used (paper: 5,000); rows with a blank caption are skipped.

Generation (official ``gen_laion_mp.py`` settings): one image per prompt, 1024², 50 steps, text CFG 4.0 on the
whole interval ``(0, 1)``, timestep shift 3.0, renorm min 0.0, black borders cropped with ``Image.getbbox()``.
Seeds: image ``i`` of the selection uses ``seed + i`` (the official script seeds once per process, so its noise
depends on the GPU count; ours depends only on the prompt's position, so shards and resumed runs agree).
Layout: ``<out>/<i:05d>_<image basename>/00000.png`` + ``metadata.json`` (the table row's ``image_path`` and
``prompt`` as the official file, plus ``key``, ``index``, ``seed``, ``source_index``), ``selection.json`` (the
prompt rule), ``generation.json`` (settings + provenance) and ``samples_grid.png``.

Sharding and resuming: shard ``I/N`` (or ``RANK``/``WORLD_SIZE``) owns prompts ``i ≡ I (mod N)``; a prompt is
skipped when its image and ``metadata.json`` both exist. Files are written to a temporary name and renamed, so an
interrupted run never leaves a truncated PNG that a resume would take for finished.

FID (official ``fid_compute.py``): reference = the real image of each generated prompt (read through the same
source; missing or unreadable ones are skipped and counted, with their generated image, so both sides have the
same N); see :mod:`unigendet.metrics.fid` for preprocessing and the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from unigendet.data.sources import (
    DEFAULT_HELDOUT_SALT,
    BadSample,
    TextToImageSource,
    load_image_file,
)
from unigendet.evaluation.harness import ShardSpec
from unigendet.evaluation.provenance import run_provenance
from unigendet.inference.generate import SamplerSettings
from unigendet.metrics.report import jsonable, write_report

logger = logging.getLogger(__name__)

OFFICIAL_SLICE = (10000, 15000)
SelectionRule = Literal["heldout", "official_slice"]
SELECTION_RULES = ("heldout", "official_slice")
IMAGE_NAME = "00000.png"
METADATA_NAME = "metadata.json"
GRID_NAME = "samples_grid.png"


# --------------------------------------------------------------------------------------------------
# Prompt tables and selection


@dataclass
class PromptTable:
    """A text-to-image table as the training loader reads it (same arguments as ``TextToImageSource``)."""

    data_files: list[str]
    image_column: str = "image_path"
    caption_column: str = "prompt"
    key_column: str | None = None
    data_format: str | None = None
    image_root: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        # Absolute paths: the scoring job re-opens the table from selection.json, possibly from another directory.
        files = [self.data_files] if isinstance(self.data_files, (str, Path)) else self.data_files
        self.data_files = [str(Path(f).absolute()) for f in files]
        self.image_root = None if self.image_root is None else str(Path(self.image_root).absolute())
        self.cache_dir = None if self.cache_dir is None else str(Path(self.cache_dir).absolute())


@dataclass
class PromptSelection:
    table: PromptTable
    rule: SelectionRule = "heldout"
    heldout_fraction: float = 0.06
    heldout_salt: str = DEFAULT_HELDOUT_SALT
    slice_start: int = OFFICIAL_SLICE[0]
    slice_stop: int = OFFICIAL_SLICE[1]
    limit: int | None = 5000

    def __post_init__(self) -> None:
        if isinstance(self.table, dict):
            self.table = PromptTable(**self.table)
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")

    def describe(self) -> str:
        if self.rule == "heldout":
            return (f"held-out split of the training loader (salted SHA-1 of the record key < "
                    f"{self.heldout_fraction}, salt {self.heldout_salt!r}): disjoint from a training run with the "
                    f"same data files, key column, fraction and salt")
        return (f"official positional slice [{self.slice_start}:{self.slice_stop}] of the table: NOT a verified "
                f"held-out split (list order depends on the machine that built it)")


@dataclass
class EvalPrompt:
    index: int  # position in the selection: folder index and seed offset
    key: str  # the training loader's record key
    prompt: str
    image_path: str | None  # the table's image cell when it is a path (LAION final_metadata.json)
    source_index: int  # row index inside the opened source


class _ImageOnlyEncoder:
    """Stands in for the training ``SampleEncoder``: ``TextToImageSource.load`` then returns the decoded RGB image
    (missing or broken files raise ``BadSample`` exactly as in training)."""

    def text_to_image(self, image: Image.Image, caption: str, key: str = "") -> Image.Image:
        return image


def open_source(selection: PromptSelection) -> TextToImageSource:
    """The training loader's view of the table: held-out rows only for the ``heldout`` rule, all rows otherwise."""
    t = selection.table
    split = "heldout" if selection.rule == "heldout" else "all"
    fraction = selection.heldout_fraction if selection.rule == "heldout" else 0.0
    return TextToImageSource(
        t.data_files, encoder=_ImageOnlyEncoder(), image_column=t.image_column, caption_column=t.caption_column,
        key_column=t.key_column, data_format=t.data_format, image_root=t.image_root, cache_dir=t.cache_dir,
        split=split, heldout_fraction=fraction, heldout_salt=selection.heldout_salt, name="eval-prompts",
    )


def _candidate_indices(source: TextToImageSource, selection: PromptSelection) -> range:
    if selection.rule == "heldout":
        return range(len(source))
    if selection.slice_start < 0 or selection.slice_stop <= selection.slice_start:
        raise ValueError(f"bad slice [{selection.slice_start}:{selection.slice_stop}]")
    if selection.slice_start >= len(source):
        raise ValueError(f"slice start {selection.slice_start} is past the table's {len(source)} rows")
    return range(selection.slice_start, min(selection.slice_stop, len(source)))


def select_prompts(selection: PromptSelection, source: TextToImageSource | None = None) -> list[EvalPrompt]:
    """The evaluation prompts of ``selection`` in table order, at most ``limit``."""
    source = source or open_source(selection)
    prompts: list[EvalPrompt] = []
    blank = 0
    for i in _candidate_indices(source, selection):
        if selection.limit is not None and len(prompts) >= selection.limit:
            break
        key, caption, cell = source.raw_record(i)
        if not isinstance(caption, str) or not caption.strip():
            blank += 1
            continue
        image_path = cell if isinstance(cell, str) else None
        prompts.append(EvalPrompt(len(prompts), key, caption, image_path, i))
    if blank:
        logger.warning("skipped %d selected rows with a blank caption", blank)
    if not prompts:
        raise ValueError("the prompt selection is empty")
    if selection.limit is not None and len(prompts) < selection.limit:
        logger.warning("only %d prompts selected (limit %d)", len(prompts), selection.limit)
    logger.info("%d prompts: %s", len(prompts), selection.describe())
    return prompts


# --------------------------------------------------------------------------------------------------
# Atomic files


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_save_image(image: Image.Image, path: str | Path) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_file(path: Path, content: dict, ignore: Sequence[str] = ()) -> None:
    """Write ``content`` as JSON, or check that an existing file (an earlier run or another shard) agrees on every
    key but ``ignore`` — mixing two configurations in one output folder would corrupt the evaluation."""
    content = jsonable(content)
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        differ = sorted(k for k in set(existing) | set(content)
                        if k not in ignore and existing.get(k) != content.get(k))
        if differ:
            raise ValueError(f"{path} was written with different {differ}; use a new output folder")
        return
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationSettings(SamplerSettings):
    """Sampler settings of an evaluation run plus image size, seed and batching; defaults = the official
    FID / GenEval scripts (guidance over the whole schedule, where ``gen_image`` uses (0.4, 1))."""

    cfg_interval: tuple[float, float] = (0.0, 1.0)
    height: int = 1024
    width: int = 1024
    seed: int = 42
    batch_size: int = 1
    crop_black_borders: bool = True

    def __post_init__(self) -> None:
        self.cfg_interval = tuple(float(v) for v in self.cfg_interval)
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Generator.generate`` (sampler fields and image size)."""
        fields = [f.name for f in dataclasses.fields(SamplerSettings)]
        return {"height": self.height, "width": self.width, **{name: getattr(self, name) for name in fields}}


def crop_black_border(image: Image.Image) -> Image.Image:
    """``image.crop(image.getbbox())`` as the official scripts; an all-black image is kept whole."""
    box = image.getbbox()
    return image if box is None else image.crop(box)


def generate_images(generator, prompts: Sequence[str], seeds: Sequence[int],
                    settings: GenerationSettings) -> list[Image.Image]:
    """One image per (prompt, seed) in batches of ``settings.batch_size`` (images are batch-independent)."""
    images: list[Image.Image] = []
    size = settings.batch_size
    for start in range(0, len(prompts), size):
        batch = generator.generate(list(prompts[start : start + size]), seed=list(seeds[start : start + size]),
                                   **settings.sampler_kwargs())
        images += [crop_black_border(im) if settings.crop_black_borders else im for im in batch]
    return images


def folder_name(prompt: EvalPrompt) -> str:
    """``<index:05d>_<image basename without extension>`` (official), or the sanitised key for byte-image tables."""
    stem = Path(prompt.image_path).stem if prompt.image_path else prompt.key
    return f"{prompt.index:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}"


def _prompt_done(folder: Path) -> bool:
    return (folder / IMAGE_NAME).is_file() and (folder / METADATA_NAME).is_file()


def _metadata(prompt: EvalPrompt, seed: int) -> dict[str, Any]:
    return {"image_path": prompt.image_path, "prompt": prompt.prompt, "key": prompt.key, "index": prompt.index,
            "seed": seed, "source_index": prompt.source_index}


def generate_fid_images(generator, prompts: Sequence[EvalPrompt], out_dir: str | Path, settings: GenerationSettings,
                        shard: ShardSpec = ShardSpec()) -> dict[str, int]:
    """Generate this shard's missing images into ``out_dir``; returns counts (assigned / generated / skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [p for p in prompts if shard.owns(p.index)]
    todo = [p for p in mine if not _prompt_done(out / folder_name(p))]
    logger.info("shard %s: %d prompts, %d already done, %d to generate", shard, len(mine), len(mine) - len(todo),
                len(todo))
    for start in range(0, len(todo), settings.batch_size):
        chunk = todo[start : start + settings.batch_size]
        seeds = [settings.seed + p.index for p in chunk]
        for prompt, seed, image in zip(chunk, seeds, generate_images(generator, [p.prompt for p in chunk], seeds,
                                                                    settings)):
            folder = out / folder_name(prompt)
            folder.mkdir(exist_ok=True)
            atomic_save_image(image, folder / IMAGE_NAME)
            # Written last: its presence marks the prompt as finished.
            atomic_write_text(folder / METADATA_NAME, json.dumps(_metadata(prompt, seed), ensure_ascii=False))
        logger.info("shard %s: %d / %d generated", shard, start + len(chunk), len(todo))
    return {"assigned": len(mine), "generated": len(todo), "skipped_existing": len(mine) - len(todo)}


def write_sample_grid(images: Sequence[Image.Image], path: str | Path, columns: int = 4, cell: int = 256) -> Path:
    """A PNG contact sheet of ``images`` (each fitted into ``cell``×``cell``)."""
    from unigendet.utils.images import image_grid

    thumbs = []
    for image in images:
        thumb = image.convert("RGB")
        thumb.thumbnail((cell, cell), Image.LANCZOS)
        thumbs.append(thumb)
    path = Path(path)
    atomic_save_image(image_grid(thumbs, columns=columns), path)
    return path


def generated_folders(gen_dir: str | Path) -> list[Path]:
    """Prompt folders (with a ``metadata.json``) under ``gen_dir``, sorted by name."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise FileNotFoundError(f"generation folder {gen_dir} does not exist")
    return sorted(p for p in gen_dir.iterdir() if p.is_dir() and (p / METADATA_NAME).is_file())


def _first_png(folder: Path) -> Path | None:
    if (folder / IMAGE_NAME).is_file():
        return folder / IMAGE_NAME
    return next(iter(sorted(folder.glob("*.png"))), None)


def grid_from_folders(gen_dir: str | Path, count: int = 16) -> Path | None:
    images = []
    for folder in generated_folders(gen_dir)[:count]:
        png = _first_png(folder)
        if png is not None:
            with Image.open(png) as im:
                images.append(im.convert("RGB"))
    return write_sample_grid(images, Path(gen_dir) / GRID_NAME) if images else None


# generation.json entries that may differ between the shards (or resumed runs) of one generation run: the
# checkpoint's path and the machine. Checkpoint hash, dtype and sampler settings must agree.
SHARD_FREE_KEYS = ("model", "device", "versions")


def generation_record(settings: GenerationSettings, generator, model_path: str | None) -> dict[str, Any]:
    """Provenance of a generation run (``generation.json``). The batch size is left out: images do not depend
    on it, so shards may use different ones."""
    sampler = {k: v for k, v in asdict(settings).items() if k != "batch_size"}
    return run_provenance({"sampler": sampler}, model_path, generator.model, settings.seed)


def run_fid_generation(generator, selection: PromptSelection, out_dir: str | Path, settings: GenerationSettings,
                       shard: ShardSpec = ShardSpec(), model_path: str | None = None) -> dict[str, int]:
    """Select the prompts, record the run (``selection.json``, ``generation.json``), generate this shard's images
    and refresh the sample grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = select_prompts(selection)
    write_run_file(out / "selection.json", {**asdict(selection), "num_prompts": len(prompts),
                                            "description": selection.describe()})
    write_run_file(out / "generation.json", generation_record(settings, generator, model_path), SHARD_FREE_KEYS)
    counts = generate_fid_images(generator, prompts, out, settings, shard)
    grid_from_folders(out)
    return counts


# --------------------------------------------------------------------------------------------------
# FID job


@dataclass
class FIDConfig:
    gen_dir: str
    inception_weights: str | None
    out_dir: str | None = None  # report folder; default gen_dir
    name: str = "fid"
    real_root: str | None = None  # folders without selection.json: real image = real_root / metadata image_path
    batch_size: int = 50
    dims: int = 2048
    device: str | None = None
    use_cache: bool = True


@dataclass
class _Pair:
    folder: Path
    generated: Path | None
    real_ref: str  # what the real image is (a path, or the source key)
    source_index: int | None = None
    real_path: Path | None = None


@dataclass
class _PairCounts:
    folders: int = 0
    missing_generated: int = 0
    missing_real: int = 0
    unreadable_real: int = 0
    unreadable_generated: int = 0
    skipped: list[str] = field(default_factory=list)


def _load_selection(gen_dir: Path) -> PromptSelection | None:
    path = gen_dir / "selection.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    keep = {k: v for k, v in data.items() if k in PromptSelection.__dataclass_fields__}
    return PromptSelection(**keep)


def _pairs(folders: Sequence[Path], selection: PromptSelection | None, real_root: str | None) -> list[_Pair]:
    pairs = []
    for folder in folders:
        meta = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8"))
        generated = _first_png(folder)
        if selection is not None and meta.get("source_index") is not None:
            pairs.append(_Pair(folder, generated, str(meta.get("key")), source_index=int(meta["source_index"])))
            continue
        rel = meta.get("image_path")
        if real_root is None or not rel:
            raise ValueError(f"{folder}: the real image is unknown (no selection.json next to the generated folders "
                             f"and {'no real_root' if real_root is None else 'no image_path in metadata.json'})")
        pairs.append(_Pair(folder, generated, str(rel), real_path=Path(real_root) / rel))
    return pairs


def _file_stamp(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "-"
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _fingerprint(pairs: Sequence[_Pair], weights_sha: str, dims: int, selection: PromptSelection | None) -> str:
    digest = hashlib.sha256()
    header = {"weights": weights_sha, "dims": dims, "selection": asdict(selection) if selection else None}
    digest.update(json.dumps(jsonable(header), sort_keys=True).encode())
    for p in pairs:
        real = _file_stamp(p.real_path) if p.real_path is not None else str(p.source_index)
        digest.update(f"{p.folder.name}|{_file_stamp(p.generated)}|{p.real_ref}|{real}\n".encode())
    return digest.hexdigest()


def _open_generated(path: Path | None) -> Image.Image:
    if path is None:
        raise BadSample("missing_file", "no generated PNG")
    return load_image_file(path)


def _paired_images(pairs: Sequence[_Pair], source: TextToImageSource | None,
                   counts: _PairCounts) -> Iterator[tuple[Image.Image, Image.Image]]:
    """(real, generated) images of every usable pair; a pair with either side missing or broken is skipped whole."""
    from unigendet.metrics.fid import fid_preprocess

    for pair in pairs:
        try:
            generated = _open_generated(pair.generated)
        except BadSample as bad:
            counts.missing_generated += bad.reason == "missing_file"
            counts.unreadable_generated += bad.reason != "missing_file"
            counts.skipped.append(f"{pair.folder.name}: generated: {bad}")
            continue
        try:
            if pair.source_index is not None:
                if source.key_of(pair.source_index) != pair.real_ref:
                    raise ValueError(f"{pair.folder.name}: row {pair.source_index} of the table has key "
                                     f"{source.key_of(pair.source_index)!r}, not {pair.real_ref!r}: the data files "
                                     f"changed since generation")
                real = source.load(pair.source_index)
            else:
                real = load_image_file(pair.real_path)
        except BadSample as bad:
            counts.missing_real += bad.reason in ("missing_file", "missing_image")
            counts.unreadable_real += bad.reason not in ("missing_file", "missing_image")
            counts.skipped.append(f"{pair.folder.name}: real: {bad}")
            continue
        yield fid_preprocess(real), fid_preprocess(generated)


def _activations(model, pairs, source, counts: _PairCounts, cfg: FIDConfig) -> tuple[np.ndarray, np.ndarray]:
    from unigendet.metrics.fid import inception_activations

    real_images: list[Image.Image] = []
    gen_images: list[Image.Image] = []
    real_rows, gen_rows = [], []

    def flush() -> None:
        if real_images:
            real_rows.append(inception_activations(model, real_images, cfg.batch_size, cfg.dims, preprocess=False))
            gen_rows.append(inception_activations(model, gen_images, cfg.batch_size, cfg.dims, preprocess=False))
            real_images.clear()
            gen_images.clear()

    for real, generated in _paired_images(pairs, source, counts):
        real_images.append(real)
        gen_images.append(generated)
        if len(real_images) == cfg.batch_size:
            flush()
    flush()
    if not real_rows:
        return np.empty((0, cfg.dims)), np.empty((0, cfg.dims))
    return np.concatenate(real_rows), np.concatenate(gen_rows)


def _cached_or_computed(cache: Path, fingerprint: str, compute) -> tuple[np.ndarray, np.ndarray, dict]:
    if cache.is_file():
        with np.load(cache) as data:
            if str(data["fingerprint"]) == fingerprint:
                logger.info("FID: reusing cached activations %s", cache)
                return data["real"], data["generated"], json.loads(str(data["counts"]))
        logger.info("FID: %s is stale (images or weights changed); recomputing", cache)
    real, generated, counts = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, real=real, generated=generated, fingerprint=np.array(fingerprint),
             counts=np.array(json.dumps(counts)))
    os.replace(tmp, cache)
    return real, generated, counts


def run_fid(cfg: FIDConfig, model_path: str | None = None) -> dict[str, Any]:
    """FID of the generated folders in ``cfg.gen_dir`` against their paired real images; writes the report."""
    from unigendet.inference.loading import resolve_device
    from unigendet.metrics.fid import (
        FID_WEIGHTS_NAME,
        activation_statistics,
        frechet_distance,
        load_fid_inception,
        weights_record,
    )

    gen_dir = Path(cfg.gen_dir)
    model = load_fid_inception(cfg.inception_weights, resolve_device(cfg.device))
    weights = weights_record(cfg.inception_weights)
    selection = _load_selection(gen_dir)
    folders = generated_folders(gen_dir)
    if not folders:
        raise FileNotFoundError(f"no generated prompt folders (with {METADATA_NAME}) in {gen_dir}")
    pairs = _pairs(folders, selection, cfg.real_root)
    source = open_source(selection) if any(p.source_index is not None for p in pairs) else None

    def compute():
        counts = _PairCounts(folders=len(folders))
        real, generated = _activations(model, pairs, source, counts, cfg)
        for line in counts.skipped[:10]:
            logger.warning("FID: skipped %s", line)
        return real, generated, {k: v for k, v in asdict(counts).items() if k != "skipped"}

    fingerprint = _fingerprint(pairs, weights["sha256"], cfg.dims, selection)
    if cfg.use_cache:
        real, generated, counts = _cached_or_computed(gen_dir / "fid_cache" / f"activations_{cfg.dims}.npz",
                                                      fingerprint, compute)
    else:
        real, generated, counts = compute()
    if len(real) < 2:
        raise ValueError(f"FID needs at least 2 usable pairs, found {len(real)} ({counts})")
    fid = frechet_distance(*activation_statistics(real), *activation_statistics(generated))
    notes = []
    if cfg.dims != 2048:
        notes.append(f"features of width {cfg.dims}, not pool3 (2048): not the FID protocol")
    if not weights["official_pytorch_fid_weights"]:
        notes.append(f"Inception weights are not {FID_WEIGHTS_NAME}: not comparable with published FIDs")
    if selection is not None and selection.rule == "official_slice":
        notes.append("prompts: official positional slice, not a verified held-out split")
    metrics = {"fid": {"fid": fid, "n_pairs": len(real), **{f"n_{k}": v for k, v in counts.items()},
                       "notes": notes}}
    _write_fid_report(cfg, metrics, weights, selection, gen_dir, model_path)
    return metrics


def _write_fid_report(cfg: FIDConfig, metrics: dict, weights: dict, selection: PromptSelection | None,
                      gen_dir: Path, model_path: str | None) -> None:
    settings = {
        "protocol": "pytorch-fid FID-Inception (TF 2015-12-05), centre crop + 299 LANCZOS, paired real images",
        "fid": {**asdict(cfg), "inception_weights": weights},
        "prompts": {**asdict(selection), "description": selection.describe()} if selection else
        {"description": f"official-layout folders; real images under {cfg.real_root}"},
    }
    paths = write_report(cfg.out_dir or gen_dir, cfg.name, metrics, report_provenance(gen_dir, settings, model_path))
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def report_provenance(gen_dir: str | Path, settings: dict[str, Any], model_path: str | None = None) -> dict[str, Any]:
    """Provenance of a scoring report over generated images: ``settings`` plus the generation run's record
    (``generation.json``: checkpoint, its hash, dtype, seed, sampler), which the scoring machine may not reproduce
    (it need not hold the checkpoint)."""
    path = Path(gen_dir) / "generation.json"
    generation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    provenance = run_provenance({**settings, "generation": generation}, model_path or generation.get("model"),
                                seed=generation.get("seed"))
    for key in ("dtype", "weights_sha256_head"):
        if generation.get(key) is not None and provenance.get(key) is None:
            provenance[key] = generation[key]
    return provenance
