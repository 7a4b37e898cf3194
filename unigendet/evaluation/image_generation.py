"""Generating evaluation images: sampler settings of a run, batched generation, the one-folder-per-prompt
layout, sample grids, atomic writes and the run's provenance records.

Files are written to a temporary name and renamed, so an interrupted run never leaves a truncated PNG that a
resume would take for finished. ``generation.json`` (settings + provenance) and ``selection.json`` are written
once per output folder and checked by every later shard or resumed run, so two configurations never mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from unigendet.evaluation.prompts import EvalPrompt
from unigendet.evaluation.provenance import run_provenance
from unigendet.inference.generate import SamplerSettings
from unigendet.metrics.report import jsonable

IMAGE_NAME = "00000.png"
METADATA_NAME = "metadata.json"
GRID_NAME = "samples_grid.png"


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
    """Sampler settings of an evaluation run plus image size, seed and batching. The sampler defaults are
    :class:`~unigendet.inference.generate.SamplerSettings`' except the guidance interval, which the official
    FID / GenEval scripts set to the whole schedule."""

    cfg_interval: tuple[float, float] = (0.0, 1.0)
    height: int = 1024
    width: int = 1024
    seed: int = 42
    batch_size: int = 1
    crop_black_borders: bool = True

    def validate(self) -> None:
        super().validate()
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


# --------------------------------------------------------------------------------------------------
# One folder per prompt: <index:05d>_<name>/00000.png + metadata.json


def folder_name(prompt: EvalPrompt) -> str:
    """``<index:05d>_<image basename without extension>`` (official), or the sanitised key for byte-image tables."""
    stem = Path(prompt.image_path).stem if prompt.image_path else prompt.key
    return f"{prompt.index:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}"


def prompt_done(folder: Path) -> bool:
    return (folder / IMAGE_NAME).is_file() and (folder / METADATA_NAME).is_file()


def prompt_metadata(prompt: EvalPrompt, seed: int) -> dict[str, Any]:
    return {"image_path": prompt.image_path, "prompt": prompt.prompt, "key": prompt.key, "index": prompt.index,
            "seed": seed, "source_index": prompt.source_index}


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


def first_png(folder: Path) -> Path | None:
    if (folder / IMAGE_NAME).is_file():
        return folder / IMAGE_NAME
    return next(iter(sorted(folder.glob("*.png"))), None)


def grid_from_folders(gen_dir: str | Path, count: int = 16) -> Path | None:
    images = []
    for folder in generated_folders(gen_dir)[:count]:
        png = first_png(folder)
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




def report_provenance(gen_dir: str | Path, settings: dict[str, Any], model_path: str | None = None) -> dict[str, Any]:
    """Provenance of a scoring report over generated images: ``settings`` plus the generation run's record
    (``generation.json``: checkpoint, its hash, dtype, seed, sampler), which the scoring machine may not reproduce
    (it need not hold the checkpoint)."""
    path = Path(gen_dir) / "generation.json"
    generation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    provenance = run_provenance({**settings, "generation": generation}, model_path or generation.get("model"),
                                seed=generation.get("seed"))
    for key in ("dtype", "weights_sha256"):
        if generation.get(key) is not None and provenance.get(key) is None:
            provenance[key] = generation[key]
    return provenance
