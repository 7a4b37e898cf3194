"""Intra-prompt diversity of a generator, the measure the UniGenDet paper reports: K samples per prompt,
mean LPIPS (higher = more diverse) and mean CLIP image similarity (lower = more diverse) over all C(K, 2)
pairs of each prompt, then the mean over prompts.

The paper does not name backbones, image size, pairing or prompts; the defaults here (AlexNet LPIPS v0.1 at
256², a local CLIP such as ViT-L/14, the FID prompt selection) are the project's, and every report states them.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unigendet.evaluation.harness import ShardSpec
from unigendet.evaluation.image_generation import (
    SHARD_FREE_KEYS,
    GenerationSettings,
    atomic_save_image,
    atomic_write_text,
    generate_images,
    generation_record,
    report_provenance,
    write_run_file,
    write_sample_grid,
)
from unigendet.evaluation.prompts import EvalPrompt, PromptSelection, select_prompts
from unigendet.metrics.report import write_report

logger = logging.getLogger(__name__)

LPIPS_SIZE = 256
SAMPLES_DIR = "samples"
METADATA_NAME = "metadata.json"


def pair_indices(k: int) -> list[tuple[int, int]]:
    """All C(k, 2) unordered pairs ``(i, j)``, ``i < j``."""
    return list(itertools.combinations(range(k), 2))


def mean_over_prompts(per_prompt: Sequence[float]) -> float:
    if not per_prompt:
        raise ValueError("no prompts with at least 2 samples")
    return float(np.mean(per_prompt))


# --------------------------------------------------------------------------------------------------
# CLIP (also GenEval's colour classifier)


def _require_dir(path: str | Path | None, what: str, expected: str) -> Path:
    if path is None or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{what} not found at {path}: pass a local directory holding {expected} "
                                f"(config.json + weights, saved with save_pretrained; nothing is downloaded)")
    return Path(path)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipModel:
    """A transformers CLIP model + image processor (+ tokenizer when text is needed) from a local directory."""

    def __init__(self, model_dir: str | Path | None, device: str | torch.device = "cpu", need_text: bool = False):
        from transformers import CLIPModel

        directory = _require_dir(model_dir, "CLIP model", "a transformers CLIPModel (e.g. clip-vit-large-patch14)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(directory, local_files_only=True).eval().to(self.device)
        self.processor = _image_processor(directory)
        self.tokenizer = None
        if need_text:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            _check_text_pooling(self.model.config.text_config, self.tokenizer, directory)
        self.path = str(directory)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` (fp32, CPU)."""
        rows = []
        for start in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            rows.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` (fp32, CPU)."""
        if self.tokenizer is None:
            raise RuntimeError("this ClipModel was loaded without a tokenizer (need_text=False)")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return torch.nn.functional.normalize(_pooled(features).float().cpu(), dim=-1)


def _check_text_pooling(text_config, tokenizer, directory: Path) -> None:
    """CLIP pools the text at the first ``eos_token_id`` of the model config (the arg-max token id when it is the
    legacy value 2). A config whose end token the tokenizer never emits would pool position 0 for every text,
    making all text embeddings equal: refuse it."""
    eos = getattr(text_config, "eos_token_id", None)
    if eos != 2 and eos != tokenizer.eos_token_id:
        raise ValueError(f"CLIP directory {directory}: the text config's eos_token_id ({eos}) is not the "
                         f"tokenizer's end-of-text id ({tokenizer.eos_token_id}); text pooling would be wrong")


def _image_processor(directory: Path):
    # transformers 5 picks a torchvision-backed processor by default; the PIL one needs no torchvision.
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(directory, local_files_only=True)


# --------------------------------------------------------------------------------------------------
# Metrics


def lpips_input(images: Sequence[Image.Image], size: int = LPIPS_SIZE) -> torch.Tensor:
    """RGB -> ``size``×``size`` (PIL bilinear) -> ``[N, 3, size, size]`` in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div(127.5).sub(1.0)


@torch.no_grad()
def intra_prompt_lpips(lpips_model, images: Sequence[Image.Image], size: int = LPIPS_SIZE) -> float:
    """Mean LPIPS over all unordered pairs of one prompt's samples (higher = more diverse)."""
    pairs = pair_indices(len(images))
    if not pairs:
        raise ValueError("need at least 2 samples for a pairwise mean")
    device = next(lpips_model.parameters()).device
    taps = lpips_model.taps(lpips_input(images, size).to(device))
    first = torch.tensor([i for i, _ in pairs], device=device)
    second = torch.tensor([j for _, j in pairs], device=device)
    distances = lpips_model.distance([t[first] for t in taps], [t[second] for t in taps])
    return float(distances.mean())


def intra_prompt_clip_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all unordered pairs of one prompt's normalised embeddings ``[K, D]``
    (lower = more diverse)."""
    k = embeddings.shape[0]
    if k < 2:
        raise ValueError("need at least 2 samples for a pairwise mean")
    sims = embeddings @ embeddings.T
    upper = torch.triu_indices(k, k, offset=1)
    return float(sims[upper[0], upper[1]].mean())


def diversity_scores(groups: Sequence[Sequence[Image.Image]], lpips_model=None, clip: ClipModel | None = None,
                     lpips_size: int = LPIPS_SIZE) -> dict[str, Any]:
    """Per-prompt and overall (mean over prompts) LPIPS and CLIP similarity of sample groups."""
    per_lpips, per_clip = [], []
    for images in groups:
        if lpips_model is not None:
            per_lpips.append(intra_prompt_lpips(lpips_model, images, lpips_size))
        if clip is not None:
            per_clip.append(intra_prompt_clip_similarity(clip.image_embeddings(images)))
    result: dict[str, Any] = {"n_prompts": len(groups), "samples_per_prompt": sorted({len(g) for g in groups})}
    if lpips_model is not None:
        result["lpips"] = mean_over_prompts(per_lpips)
        result["per_prompt_lpips"] = per_lpips
    if clip is not None:
        result["clip_similarity"] = mean_over_prompts(per_clip)
        result["per_prompt_clip_similarity"] = per_clip
    return result


# --------------------------------------------------------------------------------------------------
# Generation


def _sample_paths(folder: Path, k: int) -> list[Path]:
    return [folder / SAMPLES_DIR / f"{i:05d}.png" for i in range(k)]


def _samples_done(folder: Path, k: int) -> bool:
    return (folder / METADATA_NAME).is_file() and all(p.is_file() for p in _sample_paths(folder, k))


def generate_diversity_images(generator, prompts: Sequence[EvalPrompt], out_dir: str | Path, samples: int,
                              settings: GenerationSettings, shard: ShardSpec = ShardSpec()) -> dict[str, int]:
    """``samples`` images per prompt (sample k: seed ``settings.seed + k``) for this shard's unfinished prompts.

    Layout: ``<out>/<i:05d>/samples/<k:05d>.png`` + ``<out>/<i:05d>/metadata.json``; a prompt whose files all
    exist is skipped, so an interrupted run resumes where it stopped.
    """
    if samples < 2:
        raise ValueError(f"diversity needs at least 2 samples per prompt, got {samples}")
    out = Path(out_dir)
    mine = [p for p in prompts if shard.owns(p.index)]
    todo = [p for p in mine if not _samples_done(out / f"{p.index:05d}", samples)]
    logger.info("shard %s: %d prompts, %d to generate", shard, len(mine), len(todo))
    seeds = [settings.seed + k for k in range(samples)]
    for n, prompt in enumerate(todo, 1):
        folder = out / f"{prompt.index:05d}"
        (folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        images = generate_images(generator, [prompt.prompt] * samples, seeds, settings)
        for image, path in zip(images, _sample_paths(folder, samples)):
            atomic_save_image(image, path)
        meta = {"prompt": prompt.prompt, "key": prompt.key, "index": prompt.index, "seeds": seeds}
        atomic_write_text(folder / METADATA_NAME, json.dumps(meta, ensure_ascii=False))
        logger.info("shard %s: %d / %d prompts generated", shard, n, len(todo))
    return {"assigned": len(mine), "generated": len(todo), "skipped_existing": len(mine) - len(todo)}


def run_diversity_generation(generator, selection: PromptSelection, out_dir: str | Path, samples: int,
                             settings: GenerationSettings, shard: ShardSpec = ShardSpec(),
                             model_path: str | None = None) -> dict[str, int]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = select_prompts(selection)
    write_run_file(out / "selection.json", {**asdict(selection), "num_prompts": len(prompts),
                                            "description": selection.describe()})
    write_run_file(out / "generation.json", {**generation_record(settings, generator, model_path),
                                             "samples_per_prompt": samples}, SHARD_FREE_KEYS)
    counts = generate_diversity_images(generator, prompts, out, samples, settings, shard)
    first = sorted(p for p in out.iterdir() if _samples_done(p, samples)) if out.is_dir() else []
    if first:
        images = [Image.open(p).convert("RGB") for p in _sample_paths(first[0], samples)]
        write_sample_grid(images, out / "samples_grid.png")
    return counts


# --------------------------------------------------------------------------------------------------
# Scoring job


@dataclass
class DiversityConfig:
    gen_dir: str
    out_dir: str | None = None  # report folder; default gen_dir
    name: str = "diversity"
    lpips_alexnet: str | None = None
    lpips_lin: str | None = None
    clip_dir: str | None = None
    lpips_size: int = LPIPS_SIZE
    device: str | None = None


def load_sample_groups(gen_dir: str | Path) -> tuple[list[dict], list[list[Image.Image]]]:
    """(metadata, images) of every finished prompt folder, in folder order."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise FileNotFoundError(f"generation folder {gen_dir} does not exist")
    metas, groups = [], []
    for folder in sorted(p for p in gen_dir.iterdir() if (p / METADATA_NAME).is_file()):
        files = sorted((folder / SAMPLES_DIR).glob("*.png"))
        if len(files) < 2:
            logger.warning("%s: fewer than 2 samples, skipped", folder)
            continue
        metas.append(json.loads((folder / METADATA_NAME).read_text(encoding="utf-8")))
        groups.append([Image.open(f).convert("RGB") for f in files])
    if not groups:
        raise FileNotFoundError(f"no prompt folders with samples in {gen_dir}")
    return metas, groups


def run_diversity(cfg: DiversityConfig, model_path: str | None = None) -> dict[str, Any]:
    """LPIPS and/or CLIP diversity of ``cfg.gen_dir`` (each metric needs its weights); writes the report."""
    from unigendet.inference.loading import resolve_device
    from unigendet.metrics.lpips import load_lpips

    if cfg.lpips_alexnet is None and cfg.lpips_lin is None and cfg.clip_dir is None:
        raise ValueError("give the LPIPS weights (lpips_alexnet + lpips_lin) and/or a CLIP directory (clip_dir)")
    device = resolve_device(cfg.device)
    lpips_model = None
    if cfg.lpips_alexnet is not None or cfg.lpips_lin is not None:
        lpips_model = load_lpips(cfg.lpips_alexnet, cfg.lpips_lin, device)
    clip = ClipModel(cfg.clip_dir, device) if cfg.clip_dir is not None else None
    metas, groups = load_sample_groups(cfg.gen_dir)
    scores = diversity_scores(groups, lpips_model, clip, cfg.lpips_size)
    k = scores["samples_per_prompt"]
    summary = {key: scores[key] for key in ("lpips", "clip_similarity", "n_prompts") if key in scores}
    summary["samples_per_prompt"] = k[0] if len(k) == 1 else k
    summary["pairs_per_prompt"] = len(pair_indices(k[0])) if len(k) == 1 else "varies"
    metrics = {"diversity": summary}
    report_dir = Path(cfg.out_dir or cfg.gen_dir)
    _write_report(cfg, metrics, model_path)
    per_prompt = {"folders": [m.get("index") for m in metas],
                  **{key: scores[key] for key in ("per_prompt_lpips", "per_prompt_clip_similarity") if key in scores}}
    atomic_write_text(report_dir / f"{cfg.name}_per_prompt.json", json.dumps(per_prompt, indent=1) + "\n")
    return metrics


def _write_report(cfg: DiversityConfig, metrics: dict, model_path: str | None) -> None:
    gen_dir = Path(cfg.gen_dir)
    settings: dict[str, Any] = {
        "protocol": ("mean over prompts of the mean over all C(K,2) sample pairs; LPIPS alex v0.1 at "
                     f"{cfg.lpips_size}px bilinear, inputs in [-1,1]; CLIP: cosine of L2-normalised image embeddings "
                     "(transformers CLIPModel + its image processor). Backbones are the project's choice: the "
                     "paper does not name them"),
        "diversity": asdict(cfg),
    }
    if (gen_dir / "selection.json").is_file():
        settings["prompts"] = json.loads((gen_dir / "selection.json").read_text(encoding="utf-8"))
    paths = write_report(cfg.out_dir or gen_dir, cfg.name, metrics, report_provenance(gen_dir, settings, model_path))
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
