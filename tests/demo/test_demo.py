"""The demo chain GDUF -> DIGA (+ FM-only control) -> generate -> score, at the smallest sizes."""

import json
import math

import pytest
from PIL import Image

pytest.importorskip("skimage")

from unigendet.demo.run import DemoSettings, format_report, run_demo  # noqa: E402
from unigendet.utils.images import image_grid  # noqa: E402


@pytest.mark.slow
def test_demo_chain_runs_every_stage_and_reports(tmp_path):
    s = DemoSettings(steps=6, diga_steps=2, rounds=2, later_gduf_steps=2, later_warmup_steps=1, later_lr=2e-4,
                     vae_steps=4, pretrain_steps=2, num_train=16, num_heldout=8, t2i_per_photo=1,
                     samples_per_caption=1, sampling_steps=3, explain_tokens=3, baseline_steps=2)
    report = run_demo(tmp_path, s, overrides=["logging.interval=1", "checkpoint.interval=100"],
                      diga_overrides=["logging.interval=1", "checkpoint.interval=100"])
    assert (tmp_path / "vae" / "ae.safetensors").is_file() and not report["vae"]["cached"]
    # Only the later round warms up over its own steps.
    assert {"optim.warmup_steps=1", "optim.lr=0.0002"} <= set(report["rounds"][1]["gduf"]["overrides"])
    assert not any(o.startswith(("optim.warmup_steps", "optim.lr")) for o in report["rounds"][0]["gduf"]["overrides"])
    assert (tmp_path / "base" / "final").is_dir() and report["generator"]["steps"] == 2  # round 1 starts from it
    for r in (1, 2):
        for run in ("gduf", "diga"):
            assert (tmp_path / "rounds" / f"round{r}" / run / "final" / "model.safetensors").is_file()
    assert (tmp_path / "fm_only" / "final" / "model.safetensors").is_file()
    # Two rounds, each measured on the four held-out sets; round 2's detector scores both generators.
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert set(rounds[0]["detector"]["sets"]) == {"heldout", "heldout_photos", "heldout_generators", "heldout_domains"}
    assert all(v["n"] == 8 for v in rounds[1]["detector"]["sets"].values())
    assert list(rounds[1]["detector"]["by_generator"]) == ["G1", "G2"]
    assert rounds[1]["gduf"]["steps"] == 2 and 0 <= rounds[1]["generator"]["consistency"] <= 1
    # Round 2's GDUF trained on round 1's generated images as fakes (13 captions x 1 sample), each paired with a real.
    added = json.loads((tmp_path / "rounds" / "round1" / "detection.json").read_text())
    labels = [e["label"] for e in added]
    assert len(added) == 26 and labels.count(0) == labels.count(1) == 13  # FakeClue convention: 0 = fake
    table = (tmp_path / "rounds" / "coevolution.md").read_text()
    assert table.count("\n| ") == 3  # header + one row per round
    ev = report["evidence"]
    assert ev["n"] == 13 and all(len(ev[k]["p_fake"]) == 13 for k in ("stage1", "fm_only", "diga"))
    diffs = [a - b for a, b in zip(ev["diga"]["p_fake"], ev["fm_only"]["p_fake"])]
    assert ev["diga_minus_fm_only"]["p_fake"][0] == pytest.approx(sum(diffs) / len(diffs))
    # The control really is flow matching only: DIGA's alignment loss differs from the control's.
    assert rounds[0]["diga"]["align"] != ev["control"]["align"]
    assert Image.open(tmp_path / "generated_diga.png").width >= 13 * 64
    scored = json.loads((tmp_path / "eval" / "fakeclue_heldout.json").read_text())
    assert scored["metrics"]["head"]["n"] == 8
    text = format_report(report, s, tmp_path)
    assert "+2 DIGA steps" in text and "FakeClue protocol" in text and "round 2:" in text and "elapsed" in text
    # Every baseline trained on the demo's training images and was scored with UniGenDet on the same 8 images.
    table = report["detectors"]
    assert list(table) == ["unigendet", "ltd", "corit", "spectral"]
    for name, row in table.items():
        assert row["n"] == 8, name
        assert all(math.isfinite(row[k]) for k in ("accuracy", "real_recall", "fake_recall", "auc")), name
        assert row["train_seconds"] > 0, name
        if name != "unigendet":
            assert (tmp_path / "baselines" / name / "final").is_dir()
            assert f"    {name} " in text
    assert table["unigendet"]["accuracy"] == pytest.approx(rounds[0]["detector"]["sets"]["heldout"]["accuracy"])
    assert json.loads((tmp_path / "demo_report.json").read_text())["rounds"][0]["round"] == 1


def test_demo_settings_are_validated():
    with pytest.raises(ValueError, match="diga_steps"):
        DemoSettings(diga_steps=0)
    with pytest.raises(ValueError, match="sampling_steps"):
        DemoSettings(sampling_steps=1)
    with pytest.raises(ValueError, match="later_lr"):
        DemoSettings(later_lr=0.0)
    with pytest.raises(ValueError, match="dire"):
        DemoSettings(baselines=["ltd", "dire"])
    assert DemoSettings(baselines=["ltd", "craft"]).baselines == ["ltd", "craft"]  # CRAFT is opt-in
    assert DemoSettings(baselines=[]).baselines == []


def test_image_grid_layout():
    tiles = [Image.new("RGB", (4, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(tiles, columns=3, pad=1)
    assert grid.size == (3 * 4 + 4 * 1, 2 * 6 + 3 * 1)
    assert grid.getpixel((1 + 5, 1 + 7)) == (4 * 40, 0, 0)  # 5th tile: row 1, column 1
    with pytest.raises(ValueError):
        image_grid([], columns=2)


def test_demo_images_are_laid_out_as_ufd_with_fakeclue_labels_converted(tmp_path):
    from unigendet.demo.baselines import heldout_images, write_ufd_tree
    from unigendet.demo.data import make_demo_dataset
    from unigendet.labels import FAKECLUE_REAL

    data = make_demo_dataset(tmp_path / "data", num_train=6, num_heldout=4, image_size=16, seed=0)
    root = write_ufd_tree(data, tmp_path / "ufd")
    for split, json_path in (("train", data.train_json), ("val", data.heldout_json)):
        for entry in json.loads(json_path.read_text()):
            folder = "0_real" if entry["label"] == FAKECLUE_REAL else "1_fake"
            assert (root / split / "demo" / folder / entry["image"].split("/")[-1]).is_file()
        # Only the demo's real images land in 0_real (FakeClue label 1 = real, internal 0 = real).
        assert all(p.read_bytes() == (data.image_root / "images" / "real" / p.name).read_bytes()
                   for p in (root / split / "demo" / "0_real").iterdir())
    images, labels = heldout_images(root)
    assert len(images) == 4 and sorted(labels) == [0, 0, 1, 1]
