"""FID on held-out prompts, as UniGenDet evaluates generation: generate one image per selected prompt (sharded,
resumable), then score with the FID Inception against the real images paired with the prompts.

Generation (official ``gen_laion_mp.py`` settings): one image per prompt, 1024², 50 steps, text CFG 4.0 on the
whole interval ``(0, 1)``, timestep shift 3.0, renorm min 0.0, black borders cropped with ``Image.getbbox()``.
Seeds: image ``i`` of the selection uses ``seed + i`` (the official script seeds once per process, so its noise
depends on the GPU count; ours depends only on the prompt's position, so shards and resumed runs agree).
Layout: ``<out>/<i:05d>_<image basename>/00000.png`` + ``metadata.json`` (the table row's ``image_path`` and
``prompt`` as the official file, plus ``key``, ``index``, ``seed``, ``source_index``), ``selection.json`` (the
prompt rule, :mod:`unigendet.evaluation.prompts`), ``generation.json`` (settings + provenance) and
``samples_grid.png``.

Sharding and resuming: shard ``I/N`` (or ``RANK``/``WORLD_SIZE``) owns prompts ``i ≡ I (mod N)``; a prompt is
skipped when its image and ``metadata.json`` both exist.

FID (official ``fid_compute.py``): reference = the real image of each generated prompt (read through the same
source; missing or unreadable ones are skipped and counted, with their generated image, so both sides have the
same N); see :mod:`unigendet.metrics.fid` for preprocessing and the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from unigendet.data.images import load_image_file
from unigendet.data.paths import resolve_image_path
from unigendet.data.quality import BadSample
from unigendet.data.t2i import TextToImageSource
from unigendet.evaluation.harness import ShardSpec
from unigendet.evaluation.image_generation import (
    IMAGE_NAME,
    METADATA_NAME,
    SHARD_FREE_KEYS,
    GenerationSettings,
    atomic_save_image,
    atomic_write_text,
    first_png,
    folder_name,
    generate_images,
    generated_folders,
    generation_record,
    grid_from_folders,
    prompt_done,
    prompt_metadata,
    report_provenance,
    write_run_file,
)
from unigendet.evaluation.prompts import EvalPrompt, PromptSelection, open_source, select_prompts
from unigendet.metrics.report import jsonable, write_report

logger = logging.getLogger(__name__)


def generate_fid_images(generator, prompts: Sequence[EvalPrompt], out_dir: str | Path, settings: GenerationSettings,
                        shard: ShardSpec = ShardSpec()) -> dict[str, int]:
    """Generate this shard's missing images into ``out_dir``; returns counts (assigned / generated / skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [p for p in prompts if shard.owns(p.index)]
    todo = [p for p in mine if not prompt_done(out / folder_name(p))]
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
            atomic_write_text(folder / METADATA_NAME, json.dumps(prompt_metadata(prompt, seed), ensure_ascii=False))
        logger.info("shard %s: %d / %d generated", shard, start + len(chunk), len(todo))
    return {"assigned": len(mine), "generated": len(todo), "skipped_existing": len(mine) - len(todo)}



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
    """FID scoring of the generated folders in ``gen_dir`` (the generation stage writes them there too)."""

    gen_dir: str
    inception_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth; needed to score
    out_dir: str | None = None  # report folder; default gen_dir
    name: str = "fid"
    real_root: str | None = None  # folders without selection.json: real image = real_root / metadata image_path
    batch_size: int = 50  # Inception batch
    dims: Literal[64, 192, 768, 2048] = 2048  # feature block (pool3: 2048, the FID protocol)
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
        generated = first_png(folder)
        if selection is not None and meta.get("source_index") is not None:
            pairs.append(_Pair(folder, generated, str(meta.get("key")), source_index=int(meta["source_index"])))
            continue
        rel = meta.get("image_path")
        if real_root is None or not rel:
            raise ValueError(f"{folder}: the real image is unknown (no selection.json next to the generated folders "
                             f"and {'no real_root' if real_root is None else 'no image_path in metadata.json'})")
        try:  # the metadata names a file under real_root, never outside it
            real_path = resolve_image_path(Path(real_root).resolve(), str(rel), f"{folder / METADATA_NAME}")
        except BadSample as bad:
            raise ValueError(str(bad)) from bad
        pairs.append(_Pair(folder, generated, str(rel), real_path=real_path))
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
