"""Measuring a co-evolution round and writing the per-round table and plot.

Per round r, with D_r the round's detector (its GDUF export) and G_k the generator of round k (its DIGA export):

* detection: D_r's head on each configured held-out set (accuracy, balanced accuracy, recall per class), and on
  G_r's images, which D_r never trained on (fraction called fake);
* D_r's mean p(fake) on the images of every generator so far (G_1 ... G_r): how the detector sees each
  generation of generators;
* generation: G_r's caption consistency and its Fréchet distance / KID to held-out real images, on the fixed image
  features of :mod:`unigendet.metrics.image_quality`.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from PIL import Image

from unigendet.coevolution.config import CoevolutionConfig
from unigendet.coevolution.rounds import PromptSet, RoundPaths, round_images
from unigendet.labels import FAKECLUE_REAL

logger = logging.getLogger(__name__)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def detection_figures(p_fake: list[float], labels: list[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy and per-class recall of ``p_fake >= 0.5`` against ``labels`` (1 = fake).
    Balanced accuracy is the mean of the two recalls (a class with no images is left out of it)."""
    calls = [int(p >= 0.5) for p in p_fake]
    real = [c == 0 for c, y in zip(calls, labels, strict=True) if y == 0]
    fake = [c == 1 for c, y in zip(calls, labels, strict=True) if y == 1]
    recalls = [r for r in (_mean(real), _mean(fake)) if r == r]
    return {"n": len(labels), "accuracy": _mean(c == y for c, y in zip(calls, labels, strict=True)),
            "balanced_accuracy": _mean(recalls), "real_recall": _mean(real), "fake_recall": _mean(fake),
            "mean_p_fake": _mean(p_fake)}


def load_fakeclue_images(json_path: str | Path, image_root: str | Path | None) -> tuple[list[Image.Image], list[int]]:
    """(images, labels with 1 = fake) of a FakeClue JSON list."""
    entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
    root = Path(image_root) if image_root else Path(json_path).parent
    images = [Image.open(root / e["image"]).convert("RGB") for e in entries]
    return images, [0 if int(e["label"]) == FAKECLUE_REAL else 1 for e in entries]


def head_scores(detector, images: list[Image.Image], seed: int) -> list[float]:
    return [float(r.p_fake) for r in detector.detect(images, max_new_tokens=0, seed=seed)]


def _table_images(path: str, image_column: str, group_column: str | None) -> tuple[list[Image.Image], list[str]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if rows and (image_column not in rows[0] or (group_column and group_column not in rows[0])):
        raise ValueError(f"{path}: needs columns {image_column!r}" + (f" and {group_column!r}" if group_column else ""))
    images = []
    for row in rows:
        cell = row[image_column]
        source = io.BytesIO(cell) if isinstance(cell, bytes) else Path(path).parent / str(cell)
        images.append(Image.open(source).convert("RGB"))
    return images, [str(row[group_column]) if group_column else "" for row in rows]


def generator_quality(cfg: CoevolutionConfig, images: list[Image.Image], groups: list[str | None]) -> dict:
    """Caption consistency (when the prompts have groups and a consistency table is set) and the distances to the
    held-out reals (when a distance table is set)."""
    from unigendet.metrics.image_quality import caption_consistency, distribution_distances

    ref = cfg.reference
    figures: dict = {"n": len(images)}
    if ref.consistency and all(g is not None for g in groups):
        references, ids = _table_images(ref.consistency, ref.image_column, ref.group_column)
        result = caption_consistency(images, list(groups), references, ids)
        figures.update(consistency=result["score"], consistency_chance=result["chance"],
                       consistent=result.get("matches"))
    if ref.distance:
        reals, _ = _table_images(ref.distance, ref.image_column, None)
        figures.update(distribution_distances(images, reals))
    return figures


def measure_round(cfg: CoevolutionConfig, index: int, prompt_set: PromptSet) -> dict:
    """Detection and generation figures of round ``index`` (see the module docstring)."""
    from unigendet.inference.loading import build_detector, resolve_device

    paths = RoundPaths.of(cfg.out_dir, index)
    detector = build_detector(paths.detector, device=resolve_device(None))
    sets = {}
    for name, json_path in cfg.eval_sets.items():
        images, labels = load_fakeclue_images(json_path, cfg.eval_image_root)
        sets[name] = detection_figures(head_scores(detector, images, cfg.seed), labels)
    by_generator = {}
    newest = None
    for k in range(1, index + 1):
        images = round_images(RoundPaths.of(cfg.out_dir, k), prompt_set.prompts)
        scores = head_scores(detector, images, cfg.seed)
        by_generator[f"G{k}"] = {"mean_p_fake": _mean(scores), "called_fake": _mean(p >= 0.5 for p in scores)}
        if k == index:
            newest = images
    return {"detector": {"sets": sets, "newest_generator": by_generator[f"G{index}"], "by_generator": by_generator},
            "generator": generator_quality(cfg, newest, prompt_set.groups)}


# --------------------------------------------------------------------------------------------------
# Report files


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def round_table(records: list[dict]) -> list[str]:
    """Markdown table: one row per round."""
    set_names = sorted({name for r in records for name in r["detector"]["sets"]})
    header = ["round", *(f"{n} bal. acc" for n in set_names), "newest G called fake", "consistency", "FD", "KID",
              "p(fake) by generator"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        det, gen = r["detector"], r["generator"]
        cells = [str(r["round"]), *(_pct(det["sets"].get(n, {}).get("balanced_accuracy")) for n in set_names),
                 _pct(det["newest_generator"]["called_fake"]), _pct(gen.get("consistency")), _num(gen.get("fd"), 2),
                 _num(gen.get("kid"), 4),
                 ", ".join(f"{k} {v['mean_p_fake']:.3f}" for k, v in det["by_generator"].items())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot(records: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no co-evolution plot (pip install 'unigendet[eval]')")
        return None
    rounds = [r["round"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in sorted({n for r in records for n in r["detector"]["sets"]}):
        axes[0].plot(rounds, [r["detector"]["sets"].get(name, {}).get("balanced_accuracy") for r in records],
                     marker="o", label=name)
    axes[0].plot(rounds, [r["detector"]["newest_generator"]["called_fake"] for r in records], marker="s",
                 linestyle="--", label="newest generator called fake")
    axes[0].set(title="detector D_r", xlabel="round", ylim=(0, 1.05))
    axes[0].legend(fontsize=7)
    for key, label in (("consistency", "caption consistency"), ("kid", "KID to held-out reals")):
        axes[1].plot(rounds, [r["generator"].get(key) for r in records], marker="o", label=label)
    axes[1].set(title="generator G_r", xlabel="round")
    axes[1].legend(fontsize=7)
    for k in range(1, len(records) + 1):
        xs = [r["round"] for r in records if f"G{k}" in r["detector"]["by_generator"]]
        axes[2].plot(xs, [r["detector"]["by_generator"][f"G{k}"]["mean_p_fake"] for r in records
                          if f"G{k}" in r["detector"]["by_generator"]], marker="o", label=f"images of G{k}")
    axes[2].set(title="D_r's mean p(fake)", xlabel="round (detector)", ylim=(0, 1.05))
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(records: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "coevolution.json", "markdown": out_dir / "coevolution.md"}
    files["json"].write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    files["markdown"].write_text("# Co-evolution rounds\n\n" + "\n".join(round_table(records)) + "\n",
                                 encoding="utf-8")
    plot = _plot(records, out_dir / "coevolution.png")
    if plot is not None:
        files["plot"] = plot
    return files
