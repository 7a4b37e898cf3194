"""Baseline detectors trained by the project's Trainer and DeepSpeed engine (``stage: detector``), on CPU, on a
tiny GenImage-style folder written here; the runs are subprocesses like a real launch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from helpers.folders import write_genimage
from PIL import Image

from unigendet.cli import main
from unigendet.config.loader import ConfigError
from unigendet.data.image_folders import ImageFolderConfig, ImageFolderLoader
from unigendet.training.config import load_train_config

TRAIN = REPO / "configs" / "train"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# Trains, then writes what the tests compare: p(fake) of the in-memory detector and of its export.
TRAIN_AND_SCORE = """
import json, sys
from pathlib import Path
from PIL import Image
from unigendet.detectors import base
from unigendet.training.config import load_train_config
from unigendet.training.trainer import Trainer
from unigendet.utils.logging import setup_logging

setup_logging("INFO")
recipe, out, images, *overrides = sys.argv[1:]
trainer = Trainer(load_train_config(recipe, overrides))
trainer.train()
pictures = [Image.open(p).convert("RGB") for p in sorted(Path(images).rglob("*.png"))]
own = trainer.objective.detector.predict_proba(pictures)
loaded = base.load_detector(Path(trainer.cfg.checkpoint.dir) / "final").predict_proba(pictures)
Path(out).write_text(json.dumps({"own": own, "loaded": loaded}))
"""


def _image(rng: np.random.Generator, fake: bool, size: int = 36) -> Image.Image:
    """Smooth colour noise; fakes carry an 8-pixel grid and a warmer tint (learnable by every detector)."""
    coarse = rng.uniform(0, 255, (size // 6, size // 6, 3))
    pixels = np.kron(coarse, np.ones((6, 6, 1)))[:size, :size]
    if fake:
        pixels[::8, :, :] += 60
        pixels[:, ::8, :] += 60
        pixels[..., 0] += 40
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def genimage(tmp_path_factory) -> Path:
    """``<root>/toygen/{train,val}/{ai,nature}/*.png``: 16 real and 16 fake training images, 4 + 4 for val."""
    return write_genimage(tmp_path_factory.mktemp("genimage"), _image, {"train": 16, "val": 4})


def _common(genimage: Path, ckpt: Path) -> list[str]:
    return [f"images.root={genimage}", f"checkpoint.dir={ckpt}", "logging.interval=1", "logging.progress_bar=never",
            "images.num_workers=1"]


def run_cli(recipe: str, genimage: Path, ckpt: Path, overrides: list[str], nproc: int = 1,
            timeout: int = 300) -> tuple[list[dict], str]:
    """``unigendet train --config configs/train/<recipe>``; returns (metrics.jsonl entries, stderr)."""
    args = ["-m", "unigendet.cli", "train", "--config", str(TRAIN / recipe), *_common(genimage, ckpt), *overrides]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    path = ckpt / "metrics.jsonl"
    history = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return history, proc.stderr


def run_and_score(recipe: str, genimage: Path, ckpt: Path, overrides: list[str],
                  timeout: int = 300) -> tuple[list[dict], dict, str]:
    out = ckpt.parent / f"{ckpt.name}_scores.json"
    cmd = [sys.executable, "-c", TRAIN_AND_SCORE, str(TRAIN / recipe), str(out), str(genimage / "toygen" / "val"),
           *_common(genimage, ckpt), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    path = ckpt / "metrics.jsonl"
    history = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return history, json.loads(out.read_text()), proc.stderr


# ------------------------------------------------------------------------------------------------ training runs
def test_tiny_ltd_learns_a_fixed_batch_and_its_export_scores_like_the_trained_model(tmp_path, genimage):
    ckpt = tmp_path / "ltd"
    history, scores, _ = run_and_score("ltd_tiny.yaml", genimage, ckpt, [
        "images.overfit_batches=1", "total_steps=12", "checkpoint.interval=6", "optim.lr=3e-3",
        "detector.config.encoder_dropout=0.0"])
    assert [h["step"] for h in history] == list(range(1, 13))
    assert all(k in history[0] for k in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s"))
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    manifest = ckpt / "step_0000012"
    assert (manifest / "COMPLETE").is_file() and (manifest / "train_config.yaml").is_file()
    assert scores["own"] == pytest.approx(scores["loaded"], abs=1e-6)
    assert len(scores["own"]) == 8 and len(set(round(s, 6) for s in scores["own"])) > 1


def test_tiny_resnet_fine_tunes_through_the_trainer_and_exports(tmp_path, genimage):
    ckpt = tmp_path / "resnet"
    history, scores, stderr = run_and_score("resnet_tiny.yaml", genimage, ckpt, [
        "images.overfit_batches=1", "total_steps=10", "checkpoint.interval=10", "optim.lr=3e-3"])
    assert [h["step"] for h in history] == list(range(1, 11))
    assert re.search(r"after construction: peak host RSS per rank \[\d+\.\d+\] GiB", stderr)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert scores["own"] == pytest.approx(scores["loaded"], abs=1e-6)
    assert len(set(round(s, 6) for s in scores["own"])) > 1


def test_resumed_ltd_run_continues_exactly(tmp_path, genimage):
    """Random crops, flips, Gumbel draws and dropout all replay: the resumed losses equal the uninterrupted ones."""
    common = ["checkpoint.interval=3", "checkpoint.export_final=false", "images.batch_size=4"]
    full, _ = run_cli("ltd_tiny.yaml", genimage, tmp_path / "full", [*common, "total_steps=6"])
    first, _ = run_cli("ltd_tiny.yaml", genimage, tmp_path / "split", [*common, "total_steps=3"])
    resumed, _ = run_cli("ltd_tiny.yaml", genimage, tmp_path / "split", [*common, "total_steps=6"])
    assert [h["step"] for h in first] == [1, 2, 3]
    after = [h for h in resumed if h["step"] > 3]
    assert [h["step"] for h in after] == [4, 5, 6]
    for a, b in zip(full[3:], after):
        for key in ("loss", "accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    # The batches after the checkpoint are not the first ones again (the data position was restored).
    assert [h["loss"] for h in full[3:]] != [h["loss"] for h in full[:3]]


def test_spectral_reference_mode_fits_statistics_and_exports_without_steps(tmp_path, genimage):
    ckpt = tmp_path / "reference"
    history, scores, stderr = run_and_score("spectral_tiny.yaml", genimage, ckpt, [
        "detector.config.mode=reference", "total_steps=5", "detector.cache_dir=null", "detector.statistics_images=32"])
    assert history == [] and "no optimizer steps" in stderr
    assert (ckpt / "final" / "detector.json").is_file()
    assert scores["own"] == pytest.approx(scores["loaded"], abs=1e-6)


def test_spectral_learned_mode_trains_from_the_feature_cache(tmp_path, genimage):
    cache = tmp_path / "cache"
    history, stderr = run_cli("spectral_tiny.yaml", genimage, tmp_path / "learned", [
        f"detector.cache_dir={cache}", "total_steps=6", "checkpoint.interval=6", "optim.lr=0.05"])
    assert "frozen-feature cache in use" in stderr and "frozen-feature cache hit" in stderr
    assert len(list(cache.rglob("*.safetensors"))) == 32  # every training image once
    assert history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "learned" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_process_corit_with_sam_through_the_engine(tmp_path, genimage):
    ckpt = tmp_path / "corit"
    history, stderr = run_cli("corit_tiny.yaml", genimage, ckpt, [
        "images.overfit_batches=1", "images.batch_size=4", "total_steps=6", "checkpoint.interval=6"], nproc=2,
        timeout=600)
    assert "SAM (rho 0.05)" in stderr
    assert [h["step"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < history[0]["loss"]
    from unigendet.detectors.base import load_detector

    detector = load_detector(ckpt / "final")
    assert detector.name == "corit"
    assert (ckpt / "step_0000006" / "rank_state_00001.json").is_file()


def test_the_trainers_sam_step_is_the_detectors_sam_update(genimage):
    """Ascend, second backward, restore, base step (what the trainer does around the engine) equals CoRIT's own
    SAM optimiser on the same batch."""
    import torch

    from unigendet.detectors.base import build_detector, detector_config
    from unigendet.training.sharpness import SharpnessStep

    config = detector_config("corit", REPO / "configs" / "detectors" / "corit_tiny.yaml", ["sam_rho=0.5"])
    own, split = build_detector("corit", config), build_detector("corit", config)
    rng = np.random.default_rng(2)
    batch = own.collate([_image(rng, i % 2 == 0) for i in range(4)], [1, 0, 1, 0], train=True)
    own.training_step(batch, own.make_optimizer(lr=1e-2))
    params = [p for _, p in split.trainable_parameters()]
    base = torch.optim.Adam(params, lr=1e-2)
    sharpness = SharpnessStep(params, 0.5)
    split.train()
    split.loss(batch)["loss"].backward()
    sharpness.ascend()
    assert sharpness.last_perturbation_norm == pytest.approx(0.5, rel=1e-4)
    split.loss(batch)["loss"].backward()
    sharpness.restore()
    base.step()
    fresh = build_detector("corit", config)
    for (name, a), (_, b) in zip(own.trainable_parameters(), split.trainable_parameters()):
        torch.testing.assert_close(a, b, msg=name)
        assert not torch.equal(a, fresh.get_parameter(name)), name


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("recipe, override, key", [
    ("ltd_tiny.yaml", "freeze.vit=true", "freeze.vit"),
    ("ltd_tiny.yaml", "activation_checkpointing=true", "activation_checkpointing"),
    ("ltd_tiny.yaml", "model.visual_gen=false", "model.visual_gen"),
    ("ltd_tiny.yaml", "gduf.det_weight=1.0", "gduf.det_weight"),
    ("gduf_demo.yaml", "detector.name=corit", "detector.name"),
    ("gduf_demo.yaml", "images.root=/data/GenImage", "images.root"),
])
def test_a_section_the_stage_does_not_read_is_an_error(recipe, override, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}[,:].* stage '\w+' does not read"):
        load_train_config(str(TRAIN / recipe), [override])


@pytest.mark.parametrize("recipe, overrides, match", [
    ("corit_tiny.yaml", ["deepspeed.zero_stage=2"], "SAM"),
    ("corit_tiny.yaml", ["deepspeed.gradient_accumulation_steps=2"], "SAM takes its two gradients"),
    ("ltd_tiny.yaml", ["deepspeed.zero_stage=3"], "zero_stage"),
    ("ltd_tiny.yaml", ["deepspeed.precision=bf16"], "fp32"),
    ("ltd_tiny.yaml", ["detector.config.window_n=99"], r"^detector\.config: window_n"),
    ("ltd_tiny.yaml", ["detector.name=nope"], r"^detector\.name: unknown detector"),
    ("ltd_tiny.yaml", ["images.layout=nope"], r"^images\.layout"),
])
def test_detector_stage_rules(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(str(TRAIN / recipe), overrides)


def test_corit_without_sam_may_use_zero_2():
    cfg = load_train_config(str(TRAIN / "corit_tiny.yaml"), ["deepspeed.zero_stage=2", "detector.config.sam_rho=0.0"])
    assert cfg.detector.sharpness_radius == 0.0


def test_the_run_config_records_every_detector_key():
    cfg = load_train_config(str(TRAIN / "ltd_tiny.yaml"))
    assert cfg.detector.config["window_n"] == 3 and cfg.detector.config["backbone"]["hidden_size"] == 64
    assert "eval_selection" in cfg.detector.config  # a default the recipe does not spell out


@pytest.mark.parametrize("recipe, missing", [
    ("ltd.yaml", ["images.root: no such directory: data/GenImage",
                  "detector.config.backbone.path: no such directory: checkpoints/clip-vit-large-patch14"]),
    ("corit.yaml", ["images.root: no such directory: data/ForenSynths", "detector.config.backbone.path"]),
])
def test_dry_run_of_a_real_size_recipe_names_the_missing_inputs(recipe, missing, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(TRAIN / recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    for text in missing:
        assert text in err


def test_dry_run_of_a_tiny_recipe_with_its_data_passes(genimage, capsys):
    assert main(["train", "--config", str(TRAIN / "ltd_tiny.yaml"), f"images.root={genimage}", "--dry-run"]) == 0
    assert "config valid, inputs found" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ image folders
def test_image_folder_batches_shard_shuffle_and_resume(genimage, tmp_path):
    cfg = ImageFolderConfig(layout="genimage", root=str(genimage), batch_size=5, num_workers=0, seed=3)
    ranks = [ImageFolderLoader.build(cfg, r, 2) for r in (0, 1)]
    epoch = [[key for b in ranks[r].epoch_batches(0) for key in b] for r in (0, 1)]
    assert sorted(epoch[0] + epoch[1]) == list(range(32)) and not set(epoch[0]) & set(epoch[1])
    assert ranks[0].epoch_batches(1) != ranks[0].epoch_batches(0)
    stream = iter(ranks[0])
    seen = [next(stream).keys for _ in range(5)]  # crosses the epoch boundary (4 batches per epoch)
    again = ImageFolderLoader.build(cfg, 0, 2)
    partial = iter(again)
    next(partial), next(partial)
    state = json.loads(json.dumps(again.state_dict()))
    resumed = ImageFolderLoader.build(cfg, 0, 2)
    resumed.load_state_dict(state)
    assert [b.keys for _, b in zip(range(3), resumed)] == seen[2:]
    assert resumed.counter.good == 2 * 5 + 5 + 1 + 5


def test_bad_images_are_counted_and_left_out(tmp_path):
    root = tmp_path / "gi"
    rng = np.random.default_rng(1)
    for folder, fake in (("ai", True), ("nature", False)):
        (root / "g" / "train" / folder).mkdir(parents=True)
        for i in range(3):
            _image(rng, fake).save(root / "g" / "train" / folder / f"{i}.png")
    (root / "g" / "train" / "ai" / "broken.png").write_bytes(b"not a png")
    cfg = ImageFolderConfig(layout="genimage", root=str(root), batch_size=7, num_workers=0, shuffle=False,
                            min_seen_for_bad_check=1, max_bad_fraction=0.5)
    loader = ImageFolderLoader.build(cfg, 0, 1)
    batch = next(iter(loader))
    assert len(batch) == 6 and batch.labels.count(1) == 3
    assert loader.counter.bad == {"unreadable_image": 1}
    loader.check_quality()
    strict = ImageFolderLoader.build(ImageFolderConfig(layout="genimage", root=str(root), batch_size=7, num_workers=0,
                                                       min_seen_for_bad_check=1, max_bad_fraction=0.1), 0, 1)
    next(iter(strict))
    with pytest.raises(Exception, match="bad-sample fraction"):
        strict.check_quality()
