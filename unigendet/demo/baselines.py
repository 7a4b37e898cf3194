"""The demo's baseline detectors: LTD, CoRIT and the spectral detector trained on the demo's training images and
scored, next to UniGenDet, on the same held-out images.

The demo's FakeClue JSONs are laid out as a UniversalFakeDetect-style tree (``<root>/{train,val}/demo/
{0_real,1_fake}/<image>``, hard links where the file system allows, else copies), so each detector trains through
the Trainer from its tiny recipe with nothing but ``images.*`` overrides. The tiny detectors have random frozen
backbones (no weights can be downloaded), so their figures may be close to chance; they are reported as measured.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from unigendet.labels import parse_label
from unigendet.metrics.detection import binary_summary, head_predictions, ranking_metrics
from unigendet.recipes import recipe_path

logger = logging.getLogger(__name__)

BASELINES = ("ltd", "corit", "spectral")
# Detectors the demo trains only when asked (``demo.baselines=[ltd,corit,spectral,craft]``): CRAFT runs a few DDIM
# steps through three diffusion components per image, roughly 30-40 s more on two CPU cores.
OPTIONAL_BASELINES = ("craft",)
UFD_SUBSET = "demo"
UFD_SPLITS = {"train": "train", "heldout": "val"}  # demo split -> UFD split folder
_CLASS_DIRS = {0: "0_real", 1: "1_fake"}  # internal label -> UFD folder


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), copying when links are not possible (another device)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_ufd_tree(data, root: Path) -> Path:
    """Lay the demo's train and held-out images out as ``<root>/{train,val}/demo/{0_real,1_fake}/``; labels come
    from the FakeClue JSONs (FakeClue convention, converted to the internal one). Returns ``root``."""
    shutil.rmtree(root, ignore_errors=True)  # a rebuilt dataset may hold fewer images
    for split, json_path in (("train", data.train_json), ("heldout", data.heldout_json)):
        entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
        for i, entry in enumerate(entries):
            label = parse_label(entry["label"], "fakeclue", f"{json_path}[{i}]")
            folder = root / UFD_SPLITS[split] / UFD_SUBSET / _CLASS_DIRS[label]
            folder.mkdir(parents=True, exist_ok=True)
            source = Path(data.image_root) / entry["image"]
            _link_or_copy(source, folder / source.name)
    return root


def heldout_images(ufd_root: Path) -> tuple[list[Image.Image], list[int]]:
    """The held-out split read back through the UFD layout loader: RGB images and internal labels."""
    from unigendet.data.image_folders import ImageFolderConfig

    records = ImageFolderConfig(layout="ufd", root=str(ufd_root), split=UFD_SPLITS["heldout"]).index()
    images = []
    for record in records:
        with Image.open(record.path) as image:
            images.append(image.convert("RGB"))
    return images, [r.label for r in records]


def baseline_overrides(name: str, ufd_root: Path, run_dir: Path, steps: int, seed: int) -> list[str]:
    """Recipe overrides training ``name``'s tiny recipe on the demo's UFD training split."""
    overrides = [
        "images.layout=ufd",
        f"images.root={ufd_root}",
        f"images.split={UFD_SPLITS['train']}",
        "images.num_workers=0",  # the demo images are tiny PNGs; a worker process costs more than it saves
        f"checkpoint.dir={run_dir}",
        "checkpoint.resume=none",
        f"checkpoint.interval={steps}",
        f"logging.interval={max(1, steps // 4)}",
        f"total_steps={steps}",
        f"seed={seed}",
        f"images.seed={seed}",
    ]
    if name == "spectral":
        overrides.append(f"detector.cache_dir={run_dir.parent / 'feature_cache'}")
    return overrides


def detector_row(p_fake: Sequence[float], labels: Sequence[int], train_seconds: float) -> dict[str, Any]:
    """Accuracy, real/fake recall (fake when p >= 0.5, as UniGenDet's head), AUC and training time of one
    detector."""
    summary = binary_summary(list(labels), head_predictions(p_fake))
    return {
        "n": summary["n"],
        "accuracy": summary["overall_acc"],
        "real_recall": summary["real_acc"],
        "fake_recall": summary["fake_acc"],
        "auc": ranking_metrics(list(labels), [float(p) for p in p_fake])["auc"],
        "train_seconds": train_seconds,
    }


def run_baselines(data, out: Path, names: Sequence[str], steps: int, seed: int,
                  train: Callable[[Path, list[str]], Any]) -> dict[str, dict[str, Any]]:
    """Train each named baseline with ``train(recipe, overrides)`` and score it on the held-out split; returns
    ``{name: row}`` with rows as :func:`detector_row`."""
    from unigendet.detectors.base import load_detector

    ufd_root = write_ufd_tree(data, out / "data_ufd")
    images, labels = heldout_images(ufd_root)
    rows = {}
    for name in names:
        run_dir = out / "baselines" / name
        start = time.perf_counter()
        train(recipe_path(f"train/{name}_tiny.yaml"), baseline_overrides(name, ufd_root, run_dir, steps, seed))
        seconds = time.perf_counter() - start
        p_fake = load_detector(run_dir / "final").predict_proba(images)
        rows[name] = detector_row(p_fake, labels, seconds)
        logger.info("demo baseline %s: %s", name, rows[name])
    return rows


def _pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def format_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The comparison table as report lines (one header, one line per detector)."""
    lines = [f"    {'detector':<22} {'Acc':>7} {'real':>7} {'fake':>7} {'AUC':>7} {'train s':>8}"]
    for name, row in rows.items():
        lines.append(f"    {name:<22} {_pct(row['accuracy']):>7} {_pct(row['real_recall']):>7} "
                     f"{_pct(row['fake_recall']):>7} {_pct(row['auc']):>7} {row['train_seconds']:>8.1f}")
    return lines
