"""CRAFT from the command line: ``unigendet train`` on the tiny recipe (Trainer + DeepSpeed engine, inverted latents
cached on disk), then ``unigendet eval compare`` scores the export like any other detector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from helpers.folders import write_genimage
from PIL import Image

from unigendet.cli import main
from unigendet.detectors.base import load_detector

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _image(rng: np.random.Generator, fake: bool, size: int = 32) -> Image.Image:
    coarse = rng.uniform(0, 255, (size // 8, size // 8, 3))
    pixels = np.kron(coarse, np.ones((8, 8, 1)))
    if fake:
        pixels[::2, ::2] += 50
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def genimage(tmp_path_factory) -> Path:
    """``<root>/toygen/{train,val}/{ai,nature}/*.png``: 8 + 8 training images, 3 + 3 validation images."""
    return write_genimage(tmp_path_factory.mktemp("genimage"), _image, {"train": 8, "val": 3})


@pytest.mark.slow
def test_cli_train_on_two_ranks_with_latent_cache_then_eval_compare(tmp_path, genimage, capsys):
    ckpt, cache = tmp_path / "craft", tmp_path / "latents"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "unigendet.cli", "train", "--config", str(REPO / "configs/train/craft_tiny.yaml"),
            f"images.root={genimage}", f"checkpoint.dir={ckpt}", f"detector.cache_dir={cache}", "total_steps=2",
            "checkpoint.interval=2", "logging.interval=1", "logging.progress_bar=never", "images.num_workers=0",
            "images.batch_size=4"]
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    # 2 steps x 2 ranks x 4 images = the 16 training images once: every one has its inverted latent on disk.
    assert len(list(cache.rglob("*.safetensors"))) == 16
    detector = load_detector(ckpt / "final")
    # The running statistics are summed over both ranks: all 8 reals moved the real-class centre, all 16 the
    # distance statistics (rank 0 alone saw half of them).
    assert float(detector.mu_real_count) == 8 and float(detector.classifier.d_count) == 16

    out = tmp_path / "reports"
    assert main(["eval", "compare", "--detectors", f"craft:{ckpt / 'final'}", "--benchmark", "genimage", "--root",
                 str(genimage), "--out", str(out), "--batch-size", "3", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out)["craft"]
    assert row["n"] == 6 and row["images_per_s"] > 0
    files = sorted((genimage / "toygen" / "val").rglob("*.png"))
    scores = detector.predict_proba([Image.open(f).convert("RGB") for f in files])
    labels = [int(f.parent.name == "ai") for f in files]
    pairs = [(p, q) for p, y in zip(scores, labels) if y for q, z in zip(scores, labels) if not z]
    assert row["auc"] == pytest.approx(sum((p > q) + 0.5 * (p == q) for p, q in pairs) / len(pairs))


@pytest.mark.slow
def test_demo_trains_and_scores_craft_when_asked(tmp_path):
    from unigendet.demo.baselines import run_baselines
    from unigendet.demo.data import make_demo_dataset
    from unigendet.demo.run import _train

    data = make_demo_dataset(tmp_path / "data", num_train=8, num_heldout=6, image_size=32, seed=0)
    rows = run_baselines(data, tmp_path, ["craft"], steps=2, seed=0, train=_train)
    assert rows["craft"]["n"] == 6 and rows["craft"]["train_seconds"] > 0
    assert (tmp_path / "baselines" / "craft" / "final" / "detector.json").is_file()
