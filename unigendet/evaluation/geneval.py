"""GenEval text-image alignment: prompt metadata, image generation in GenEval's folder layout, the scoring
rules and the summary, re-implemented from the official GenEval scripts (as BAGEL and UniGenDet ship them).

Detections and colours come either from an official GenEval ``results.jsonl`` (:func:`read_results`) or from
:class:`TransformersMask2FormerDetector` + :class:`ClipColorClassifier`, an **approximation** of the official
mmdet detector whose reports say so.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

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
from unigendet.evaluation.provenance import run_provenance
from unigendet.metrics.fid import file_sha256
from unigendet.metrics.report import jsonable, write_report

logger = logging.getLogger(__name__)

TAG_ABBREVIATIONS = OrderedDict([("single_object", "SO"), ("two_object", "TO"), ("counting", "CT"),
                                 ("colors", "CL"), ("position", "POS"), ("color_attr", "ATTR")])
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
PROMPT_SETS = ("short", "long")
SAMPLES_PER_PROMPT = 4
APPROXIMATE_SCORER = "unigendet transformers-Mask2Former (approximate)"
APPROXIMATE_NOTE = ("APPROXIMATE: detections from a transformers Mask2Former checkpoint, not the official mmdet 2.x "
                    "Mask2Former Swin-S detector; scores are not comparable with published GenEval numbers")


# --------------------------------------------------------------------------------------------------
# Metadata


def _check_clause(clause: Any, where: str, kind: str, n_include: int) -> None:
    if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
        raise ValueError(f"{where}: every {kind} clause needs a 'class' string")
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}: {kind} clause {clause['class']!r} needs a positive integer 'count'")
    if "color" in clause and clause["color"] not in COLORS:
        raise ValueError(f"{where}: unknown color {clause['color']!r}; known: {COLORS}")
    if "position" in clause:
        position = clause["position"]
        if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                or not isinstance(position[1], int) or not 0 <= position[1] < n_include):
            raise ValueError(f"{where}: position must be [relation in {RELATIONS}, include index], got {position!r}")


def validate_metadata(entry: Any, where: str) -> dict:
    """One metadata object, checked; ValueError naming ``where`` and the problem."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if entry.get("tag") not in TAG_ABBREVIATIONS:
        raise ValueError(f"{where}: unknown tag {entry.get('tag')!r}; known: {list(TAG_ABBREVIATIONS)}")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise ValueError(f"{where}: missing prompt")
    include = entry.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list")
    for clause in include:
        _check_clause(clause, where, "include", len(include))
    for clause in entry.get("exclude", []):
        _check_clause(clause, where, "exclude", len(include))
    return entry


def load_geneval_metadata(path: str | Path) -> list[dict]:
    """The metadata lines of a GenEval ``evaluation_metadata*.jsonl`` (blank lines ignored).

    ``evaluation_metadata.jsonl`` has 553 short prompts; ``evaluation_metadata_long.jsonl`` the same clauses with
    rewritten long prompts (the paper's † rows). Each line: ``tag``, ``prompt``, ``include`` (a list of
    ``{class, count[, color][, position: [relation, include_index]]}``) and an optional ``exclude`` list of
    ``{class, count}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from err
        entries.append(validate_metadata(entry, f"{path}:{number}"))
    if not entries:
        raise ValueError(f"{path}: no metadata lines")
    return entries


# --------------------------------------------------------------------------------------------------
# Generation


def _prompt_folder(out: Path, index: int) -> Path:
    return out / f"{index:05d}"


def _sample_path(folder: Path, k: int) -> Path:
    return folder / "samples" / f"{k:05d}.png"


def _geneval_done(folder: Path, samples: int) -> bool:
    return (folder / "metadata.jsonl").is_file() and all(_sample_path(folder, k).is_file() for k in range(samples))


def generate_geneval_images(generator, metadata: Sequence[dict], out_dir: str | Path, settings: GenerationSettings,
                            samples: int = SAMPLES_PER_PROMPT, shard: ShardSpec = ShardSpec()) -> dict[str, int]:
    """This shard's unfinished prompts: ``samples`` images each, in GenEval's layout.

    Layout: ``<out>/<i:05d>/metadata.jsonl`` (the metadata object, one line) and
    ``<out>/<i:05d>/samples/<k:05d>.png``; image ``k`` of prompt ``i`` uses seed ``seed + samples·i + k``.
    """
    out = Path(out_dir)
    mine = [i for i in range(len(metadata)) if shard.owns(i)]
    todo = [i for i in mine if not _geneval_done(_prompt_folder(out, i), samples)]
    logger.info("shard %s: %d prompts, %d to generate", shard, len(mine), len(todo))
    for n, index in enumerate(todo, 1):
        folder = _prompt_folder(out, index)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        seeds = [settings.seed + samples * index + k for k in range(samples)]
        images = generate_images(generator, [metadata[index]["prompt"]] * samples, seeds, settings)
        for k, image in enumerate(images):
            atomic_save_image(image, _sample_path(folder, k))
        # GenEval reads this file with json.load: one object, as the official generator writes it.
        atomic_write_text(folder / "metadata.jsonl", json.dumps(metadata[index]))
        logger.info("shard %s: %d / %d prompts generated", shard, n, len(todo))
    return {"assigned": len(mine), "generated": len(todo), "skipped_existing": len(mine) - len(todo)}


def run_geneval_generation(generator, metadata_file: str | Path, prompt_set: str, out_dir: str | Path,
                           settings: GenerationSettings, samples: int = SAMPLES_PER_PROMPT,
                           shard: ShardSpec = ShardSpec(), model_path: str | None = None) -> dict[str, int]:
    """Generate GenEval images for ``metadata_file``; ``prompt_set`` ("short" / "long") names which file it is,
    and is recorded because which file a launcher used is easy to misread."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    metadata = load_geneval_metadata(metadata_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**generation_record(settings, generator, model_path), "samples_per_prompt": samples,
              "prompt_set": prompt_set, "metadata_file": str(Path(metadata_file).absolute()),
              "metadata_sha256": file_sha256(metadata_file), "num_prompts": len(metadata)}
    write_run_file(out / "generation.json", record, ignore=(*SHARD_FREE_KEYS, "metadata_file"))
    counts = generate_geneval_images(generator, metadata, out, settings, samples, shard)
    finished = [_prompt_folder(out, i) for i in range(len(metadata)) if _geneval_done(_prompt_folder(out, i), samples)]
    images = [Image.open(_sample_path(f, k)).convert("RGB") for f in finished[:4] for k in range(samples)]
    if images:
        write_sample_grid(images, out / "samples_grid.png", columns=samples)
    return counts


# --------------------------------------------------------------------------------------------------
# Detections and rules


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    mask: np.ndarray | None = None  # bool [H, W] of the whole image, when the detector segments


class Detector(Protocol):
    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """All detections per class name, unfiltered."""


class ColorClassifier(Protocol):
    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        """One colour name (from :data:`COLORS`) per detection."""


@dataclass
class RuleConfig:
    """Scoring thresholds; the defaults are the official GenEval options (no NMS: the official overlap limit
    is 1)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = 0.1


def select_detections(raw: Mapping[str, Sequence[Detection]], tag: str,
                      cfg: RuleConfig = RuleConfig()) -> dict[str, list[Detection]]:
    """Per class: score above the tag's threshold, best first, at most ``max_objects``; empty classes dropped."""
    threshold = cfg.counting_threshold if tag == "counting" else cfg.threshold
    kept = {}
    for classname, detections in raw.items():
        # Ties keep the detector's order (the official argsort leaves their order unspecified).
        ordered = sorted((d for d in detections if d.score > threshold), key=lambda d: -d.score)
        if ordered:
            kept[classname] = ordered[: cfg.max_objects]
    return kept


# Per axis: the relation that holds when A's centre lies on the negative / positive side of B's (rows grow downwards).
_AXIS_RELATIONS = (("left of", "right of"), ("above", "below"))


def _centre_and_extent(det: Detection) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre ``(x, y)`` and extent ``(width, height)`` of a detection's box."""
    x1, y1, x2, y2 = (float(v) for v in det.box[:4])
    return ((x1 + x2) / 2, (y1 + y2) / 2), (abs(x2 - x1), abs(y2 - y1))


def _gap_beyond_margin(offset: float, margin: float) -> float:
    """``offset`` moved ``margin`` towards zero, stopping at zero (the sign of ``offset`` is kept)."""
    gap = max(abs(offset) - margin, 0.0)
    return gap if offset >= 0 else -gap


def relative_position(a: Detection, b: Detection, threshold: float = 0.1) -> set[str]:
    """Which of "left of", "right of", "above", "below" hold for object A relative to object B.

    On each axis, the offset of A's centre from B's is first moved towards zero by a margin of ``threshold``
    times the sum of the two boxes' extents on that axis (width for x, height for y), never past zero: objects
    whose centres are closer than that count as level on the axis. If both reduced offsets are under 1e-3,
    no relation holds. Otherwise each reduced offset is divided by the distance between the two centres
    (the offsets before reduction), and a relation holds where that ratio passes 0.5 in size: x below -0.5
    is "left of", above 0.5 "right of"; y below -0.5 is "above", above 0.5 "below" (image rows grow
    downwards). A clearly diagonal arrangement thus holds on both axes, a mostly horizontal one on x only.
    """
    centre_a, extent_a = _centre_and_extent(a)
    centre_b, extent_b = _centre_and_extent(b)
    offsets = [pa - pb for pa, pb in zip(centre_a, centre_b)]
    gaps = [_gap_beyond_margin(off, threshold * (ea + eb)) for off, ea, eb in zip(offsets, extent_a, extent_b)]
    if all(abs(gap) < 1e-3 for gap in gaps):
        return set()
    distance = sum(off * off for off in offsets) ** 0.5
    relations = set()
    for gap, (negative_side, positive_side) in zip(gaps, _AXIS_RELATIONS):
        ratio = gap / distance
        if ratio < -0.5:
            relations.add(negative_side)
        elif ratio > 0.5:
            relations.add(positive_side)
    return relations


def _colour_reason(required: str, classname: str, count: int, colours: list[str]) -> str:
    found = ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours)
    return f"expected {required} {classname}>={count}, found {colours.count(required)} {required}; and {found}"


def _position_failure(found: Sequence[Detection], targets: Sequence[Detection], relation: str, classname: str,
                      threshold: float) -> str | None:
    for obj in found:
        for target in targets:
            actual = relative_position(obj, target, threshold)
            if relation not in actual:
                return f"expected {classname} {relation} target, found {' and '.join(sorted(actual))} target"
    return None


def evaluate_detections(image: Image.Image | None, objects: Mapping[str, Sequence[Detection]], metadata: Mapping,
                        colour: ColorClassifier | None = None, cfg: RuleConfig = RuleConfig()) -> tuple[bool, str]:
    """(correct, reason) of one image's kept detections against its metadata (include AND-ed, exclude OR-ed).

    An ``include`` clause takes its class's top-``count`` detections and fails with fewer. With ``color``, fewer
    than ``count`` of them classified as that colour fails. With ``position: [relation, j]``, each of them must
    stand in ``relation`` (:func:`relative_position`) to every object kept by include clause ``j``, which must
    itself have matched. An ``exclude`` clause fails when its class has at least ``count`` kept detections.
    """
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        classname, count = clause["class"], clause["count"]
        found = list(objects.get(classname, []))[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        if matched and "color" in clause:
            if colour is None:
                raise ValueError(f"metadata asks for a colour ({clause['color']} {classname}) but no colour "
                                 "classifier was given")
            colours = list(colour.classify(image, found, classname))
            if colours.count(clause["color"]) < count:
                matched = False
                reasons.append(_colour_reason(clause["color"], classname, count, colours))
        if matched and "position" in clause:
            relation, group = clause["position"]
            targets = matched_groups[group] if group < len(matched_groups) else None
            failure = (f"no target for {classname} to be {relation}" if targets is None
                       else _position_failure(found, targets, relation, classname, cfg.position_threshold))
            if failure:
                matched = False
                reasons.append(failure)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        present = len(objects.get(clause["class"], []))
        if present >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {present}")
    return correct, "\n".join(reasons)


def score_image(path: str | Path, metadata: Mapping, detector: Detector, colour: ColorClassifier | None,
                cfg: RuleConfig = RuleConfig()) -> dict[str, Any]:
    """One ``results.jsonl`` row (the official fields) for image ``path``."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    objects = select_detections(detector.detect(image), metadata["tag"], cfg)
    correct, reason = evaluate_detections(image, objects, metadata, colour, cfg)
    details = {name: [[*map(float, d.box[:4]), float(d.score)] for d in dets] for name, dets in objects.items()}
    return {"filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": reason, "metadata": json.dumps(metadata), "details": json.dumps(details)}


def geneval_images(gen_dir: str | Path) -> list[tuple[Path, dict]]:
    """(image path, metadata) of every ``<digits>/samples/<digits>.png`` under ``gen_dir``, sorted."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise FileNotFoundError(f"GenEval image folder {gen_dir} does not exist")
    items = []
    for folder in sorted(p for p in gen_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            logger.warning("%s has no metadata.jsonl; skipped", folder)
            continue
        metadata = validate_metadata(json.loads(meta_path.read_text(encoding="utf-8")), str(meta_path))
        for image in sorted((folder / "samples").glob("*.png")):
            if re.fullmatch(r"\d+\.png", image.name):
                items.append((image, metadata))
    return items


def score_folder(gen_dir: str | Path, detector: Detector, colour: ColorClassifier | None, out_file: str | Path,
                 cfg: RuleConfig = RuleConfig(), scorer: str = "unigendet") -> list[dict]:
    """Score every generated image; writes ``out_file`` (JSON lines: the official columns plus ``scorer``, which
    names the backend so a later summary labels approximate results as such) and returns the rows."""
    items = geneval_images(gen_dir)
    if not items:
        raise FileNotFoundError(f"no GenEval images (<idx>/samples/<k>.png) in {gen_dir}")
    rows = []
    for n, (path, metadata) in enumerate(items, 1):
        rows.append({**score_image(path, metadata, detector, colour, cfg), "scorer": scorer})
        if n % 50 == 0 or n == len(items):
            logger.info("GenEval: scored %d / %d images", n, len(items))
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))
    return rows


# --------------------------------------------------------------------------------------------------
# Results and summary


def read_results(path: str | Path) -> list[dict]:
    """Rows of a ``results.jsonl`` (ours or the official GenEval script's pandas output)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval results file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("tag", "correct", "metadata") if k not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing {missing}")
        if not isinstance(row["correct"], bool):
            raise ValueError(f"{path}:{number}: 'correct' must be true/false, got {row['correct']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no result rows")
    return rows


def summarize(rows: Sequence[Mapping]) -> dict[str, Any]:
    """Per-tag accuracy (mean of ``correct`` over images), the overall unweighted mean of the six tag means
    (keyed by abbreviation: SO, TO, CT, CL, POS, ATTR) and the official side counts."""
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(bool(row["correct"]))
        by_prompt.setdefault(str(row["metadata"]), []).append(bool(row["correct"]))
    unknown = sorted(set(by_tag) - set(TAG_ABBREVIATIONS))
    if unknown:
        raise ValueError(f"unknown GenEval tags {unknown}")
    missing = [t for t in TAG_ABBREVIATIONS if t not in by_tag]
    if missing:
        logger.warning("GenEval: no results for %s; the overall score averages the %d tags present",
                       missing, len(by_tag))
    summary: dict[str, Any] = {}
    for tag, abbreviation in TAG_ABBREVIATIONS.items():
        if tag in by_tag:
            summary[abbreviation] = float(np.mean(by_tag[tag]))
    summary["overall"] = float(np.mean([summary[TAG_ABBREVIATIONS[t]] for t in by_tag]))
    summary["n_images"] = len(rows)
    summary["n_prompts"] = len(by_prompt)
    summary["correct_images"] = float(np.mean([c for cs in by_prompt.values() for c in cs]))
    summary["correct_prompts_any"] = float(np.mean([any(cs) for cs in by_prompt.values()]))
    summary["images_per_tag"] = {tag: len(v) for tag, v in by_tag.items()}
    summary["missing_tags"] = missing
    return summary


@dataclass
class GenEvalReportConfig:
    out_dir: str
    name: str = "geneval"
    backend: str = "external"  # "external" (official results.jsonl) or "transformers" (approximate)
    results_file: str | None = None
    gen_dir: str | None = None
    rules: RuleConfig | None = None  # the rules we applied (None when the results came from elsewhere)
    backend_details: dict = field(default_factory=dict)


def results_backend(rows: Sequence[Mapping]) -> str:
    """"transformers" when any row came from our approximate scorer, else "external" (official results)."""
    return "transformers" if any(row.get("scorer") == APPROXIMATE_SCORER for row in rows) else "external"


def write_geneval_report(rows: Sequence[Mapping], cfg: GenEvalReportConfig,
                         model_path: str | None = None) -> dict[str, Any]:
    """Summarise ``rows`` and write ``<out_dir>/<name>.json`` + ``.md``; returns the metrics."""
    summary = summarize(rows)
    notes = [APPROXIMATE_NOTE] if cfg.backend == "transformers" or results_backend(rows) == "transformers" else []
    if summary["missing_tags"]:
        notes.append(f"no results for {summary['missing_tags']}: overall averages only the tags present")
    section = {k: v for k, v in summary.items() if k not in ("images_per_tag", "missing_tags")}
    section.update({f"n_images_{TAG_ABBREVIATIONS[t]}": n for t, n in summary["images_per_tag"].items()})
    metrics = {"geneval": {**section, "notes": notes}}
    settings = {"protocol": "GenEval rules (official thresholds); overall = unweighted mean of the 6 tag means",
                "geneval": asdict(cfg)}
    provenance = (report_provenance(cfg.gen_dir, settings, model_path) if cfg.gen_dir
                  else run_provenance(settings, model_path))
    paths = write_report(cfg.out_dir, cfg.name, metrics, provenance)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return metrics


# --------------------------------------------------------------------------------------------------
# transformers backend (approximate detector + CLIP colour classifier)


def _require_model_dir(path: str | Path | None, what: str) -> Path:
    if path is None or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{what} not found at {path}: pass a local directory with config.json + weights "
                                f"(saved with save_pretrained); nothing is downloaded")
    return Path(path)


# GenEval's 80 class names (its object_names.txt, the mmdet COCO order).
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# transformers' Mask2Former COCO-instance checkpoints (facebook/mask2former-swin-*-coco-instance) take their id2label
# from huggingface/label-files coco-detection-mmdet-id2label.json: mmdet's COCO names, which GenEval renamed in
# three places (mouse, remote, keyboard). The other entries cover PASCAL-style spellings and "hair dryer".
_CLASS_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                  "hair dryer": "hair drier", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
                  "pottedplant": "potted plant", "diningtable": "dining table", "tvmonitor": "tv"}


def geneval_class_name(label: str) -> str:
    """GenEval's name for a detector label (lower case, ``_`` as space, the aliases above)."""
    name = label.strip().lower().replace("_", " ")
    return _CLASS_ALIASES.get(name, name)


def boxes_from_masks(masks: torch.Tensor) -> list[tuple[float, float, float, float]]:
    """Tight ``[x1, y1, x2 + 1, y2 + 1]`` boxes of binary masks ``[N, H, W]`` (mmdet's ``mask2bbox``)."""
    boxes = []
    for mask in masks.bool():
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        if len(cols) == 0:
            boxes.append((0.0, 0.0, 0.0, 0.0))
        else:
            boxes.append((float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)))
    return boxes


class TransformersMask2FormerDetector:
    """COCO instance segmentation with a transformers ``Mask2FormerForUniversalSegmentation`` (approximate).

    Post-processing is transformers' ``post_process_instance_segmentation``: the same query × class top-k and
    class × mean-mask-probability score as mmdet's, but masks are binarised at 384×384 and resized (nearest) to the
    image, where mmdet resizes the logits (bilinear) first; queries with empty masks are dropped. Boxes are the
    masks' tight boxes (mmdet's ``mask2bbox``)."""

    def __init__(self, model_dir: str | Path | None, device: str | torch.device = "cpu", min_score: float = 0.3):
        from transformers import Mask2FormerForUniversalSegmentation

        directory = _require_model_dir(model_dir, "Mask2Former COCO instance-segmentation model")
        self.device = torch.device(device)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(directory, local_files_only=True)
        self.model = self.model.eval().to(self.device)
        try:
            from transformers import Mask2FormerImageProcessorPil as processor_class
        except ImportError:  # transformers 4.x
            from transformers import Mask2FormerImageProcessor as processor_class
        self.processor = processor_class.from_pretrained(directory, local_files_only=True)
        self.min_score = min_score
        self.labels = {int(k): geneval_class_name(v) for k, v in self.model.config.id2label.items()}
        unknown = sorted(set(GENEVAL_CLASSES) - set(self.labels.values()))
        if unknown:
            logger.warning("Mask2Former labels in %s do not cover %d GenEval classes (%s): those are never "
                           "detected; is this a COCO instance-segmentation checkpoint?", directory, len(unknown),
                           ", ".join(unknown[:10]))
        self.path = str(directory)

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.min_score, target_sizes=[(image.height, image.width)], return_binary_maps=True)[0]
        segments = result["segments_info"]
        if not segments:
            return {}
        masks = result["segmentation"].cpu()
        detections: dict[str, list[Detection]] = {}
        for segment, mask, box in zip(segments, masks, boxes_from_masks(masks)):
            name = self.labels.get(int(segment["label_id"]), str(segment["label_id"]))
            detections.setdefault(name, []).append(Detection(box, float(segment["score"]), mask.bool().numpy()))
        return detections


COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")


def object_crop(image: Image.Image, detection: Detection, background: str = "#999") -> Image.Image:
    """The object on a flat ``background`` (via its mask, when there is one), cropped to its box."""
    image = image.convert("RGB")
    if detection.mask is not None:
        if detection.mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {detection.mask.shape} != image size {(image.height, image.width)}")
        blank = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, blank, Image.fromarray(detection.mask.astype(bool)))
    return image.crop(tuple(float(v) for v in detection.box[:4]))


class ClipColorClassifier:
    """Zero-shot colour of each detection: CLIP image embedding of its grey-composited crop against, per colour, the
    re-normalised mean of the normalised embeddings of the three templates (clip_benchmark's classifier).

    This is the official GenEval method (CLIP ViT-L/14), run on transformers instead of open_clip."""

    def __init__(self, clip, background: str = "#999"):
        self.clip = clip
        self.background = background
        self._classifiers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None, device: str | torch.device = "cpu"):
        from unigendet.evaluation.diversity import ClipModel

        return cls(ClipModel(model_dir, device, need_text=True))

    def classifier(self, classname: str) -> torch.Tensor:
        """``[len(COLORS), D]`` class embeddings for ``classname``."""
        if classname not in self._classifiers:
            rows = []
            for colour in COLORS:
                texts = [t.format(c=colour, obj=classname) for t in COLOR_TEMPLATES]
                mean = self.clip.text_embeddings(texts).mean(dim=0)
                rows.append(mean / mean.norm())
            self._classifiers[classname] = torch.stack(rows)
        return self._classifiers[classname]

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        crops = [object_crop(image, d, self.background) for d in detections]
        logits = self.clip.image_embeddings(crops) @ self.classifier(classname).T
        return [COLORS[int(i)] for i in logits.argmax(dim=1)]


# --------------------------------------------------------------------------------------------------
# GenEval job


@dataclass
class GenEvalConfig:
    """A GenEval run over the images in ``gen_dir``. Generating needs ``metadata_file`` and ``prompt_set``;
    scoring needs ``detector_dir`` and ``clip_dir`` and writes ``results`` (default
    ``<out_dir>/<name>_results.jsonl``); summarising reads ``results`` (e.g. the official scorer's output)."""

    gen_dir: str
    metadata_file: str | None = None  # evaluation_metadata.jsonl (short) or evaluation_metadata_long.jsonl (long)
    prompt_set: Literal["short", "long"] | None = None  # which of the two files metadata_file is
    samples: int = SAMPLES_PER_PROMPT
    detector_dir: str | None = None  # local transformers Mask2Former COCO-instance directory
    clip_dir: str | None = None  # local transformers CLIP ViT-L/14 directory
    results: str | None = None
    out_dir: str | None = None  # report folder; default gen_dir
    name: str = "geneval"
    device: str | None = None  # scoring device; default cuda if available, else cpu
    rules: RuleConfig = field(default_factory=RuleConfig)

    def report_dir(self) -> str:
        return self.out_dir or self.gen_dir


def run_geneval_scoring(cfg: GenEvalConfig, model_path: str | None = None) -> dict[str, Any]:
    """Score ``cfg.gen_dir`` with the approximate transformers backend, then write the report."""
    from unigendet.inference.loading import resolve_device

    device = resolve_device(cfg.device)
    detector = TransformersMask2FormerDetector(cfg.detector_dir, device)
    colour = ClipColorClassifier.from_pretrained(cfg.clip_dir, device)
    results = cfg.results or str(Path(cfg.report_dir()) / f"{cfg.name}_results.jsonl")
    rows = score_folder(cfg.gen_dir, detector, colour, results, cfg.rules, scorer=APPROXIMATE_SCORER)
    report = GenEvalReportConfig(cfg.report_dir(), cfg.name, backend="transformers", results_file=results,
                                 gen_dir=cfg.gen_dir, rules=cfg.rules,
                                 backend_details={"detector_dir": cfg.detector_dir, "clip_dir": cfg.clip_dir})
    return write_geneval_report(rows, report, model_path=model_path)


def run_geneval_summary(cfg: GenEvalConfig, model_path: str | None = None) -> dict[str, Any]:
    """The report of an existing results file ``cfg.results`` (official or ours)."""
    rows = read_results(cfg.results)
    report = GenEvalReportConfig(cfg.report_dir(), cfg.name, backend=results_backend(rows), results_file=cfg.results,
                                 gen_dir=cfg.gen_dir)
    return write_geneval_report(rows, report, model_path=model_path)
