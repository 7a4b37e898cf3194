"""Benchmark loaders over the image-folder layouts (GenImage, UniversalFakeDetect, DRCT-2M, DeepfakeBench):
one split as EvalRecords, groups, layout errors as BenchmarkError, and one layout scored through the harness
into per-group metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unigendet.evaluation.benchmarks import (
    LAYOUT_BENCHMARKS,
    Benchmark,
    BenchmarkError,
    EvalRecord,
    load_deepfakebench,
    load_diffusionforensics,
    load_drct2m,
    load_genimage,
    load_ufd,
)
from unigendet.evaluation.detectors import ProbabilityDetector
from unigendet.evaluation.harness import score_benchmark
from unigendet.labels import LABEL_FAKE, LABEL_REAL
from unigendet.metrics.detection import arforensics_metrics, head_predictions

FAKE_VALUE, REAL_VALUE = 200, 30


def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format="PNG")


def genimage(root):
    for gen in ("adm", "sdv4"):
        for split in ("train", "val"):
            for i in range(2):
                png(root / gen / split / "ai" / f"{i}.png", FAKE_VALUE)
                png(root / gen / split / "nature" / f"{i}.png", REAL_VALUE)
    return root


def test_load_genimage_one_split_as_eval_records(tmp_path):
    root = genimage(tmp_path / "GenImage")
    bench = load_genimage(root)
    assert isinstance(bench, Benchmark) and bench.name == "genimage" and bench.invalid == []
    assert bench.root == str(root.resolve())
    assert bench.groups == ["adm", "sdv4"]
    assert all(isinstance(r, EvalRecord) and "/val/" in r.key for r in bench.records)
    assert bench.records[0] == EvalRecord("adm/val/ai/0.png", str((root / "adm/val/ai/0.png").resolve()), LABEL_FAKE,
                                          "adm")
    assert bench.summary()["per_group"] == {"adm": {"real": 2, "fake": 2}, "sdv4": {"real": 2, "fake": 2}}
    train = load_genimage(root, generators=["sdv4"], split="train", limit_per_group=1)
    assert [(r.key, r.label) for r in train.records] == [("sdv4/train/ai/0.png", 1), ("sdv4/train/nature/0.png", 0)]


def test_layout_errors_become_benchmark_errors_naming_path_and_layout(tmp_path):
    root = genimage(tmp_path / "GenImage")
    for f in (root / "adm/val/nature").iterdir():
        f.unlink()
    (root / "adm/val/nature").rmdir()
    with pytest.raises(BenchmarkError) as err:
        load_genimage(root)
    assert f"{root.resolve() / 'adm/val'} has no 'nature' folder" in str(err.value)
    assert "expected <generator>/{train,val}/{ai,nature}" in str(err.value)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_drct2m(tmp_path / "missing")


def test_load_ufd_pairs_diffusion_reals_per_subset(tmp_path):
    test = tmp_path / "ufd" / "test"
    for label, value in (("0_real", REAL_VALUE), ("1_fake", FAKE_VALUE)):
        png(test / "progan/cat" / label / "a.png", value)
        png(test / "stargan" / label / "a.png", value)
    png(test / "diffusion_datasets/laion/0_real/l.png", REAL_VALUE)
    png(test / "diffusion_datasets/dalle/1_fake/d.png", FAKE_VALUE)
    bench = load_ufd(tmp_path / "ufd")
    assert bench.groups == ["dalle", "progan", "stargan"]
    assert {r.group: r.label for r in bench.records if r.key.startswith("dalle:")} == {"dalle": LABEL_REAL}
    assert bench.summary()["per_group"]["dalle"] == {"real": 1, "fake": 1}
    assert load_ufd(test).groups == bench.groups  # root = the test folder itself
    with pytest.raises(BenchmarkError, match="unknown split"):
        load_ufd(tmp_path / "ufd", split="train")


def test_load_drct2m_pairs_reals_by_default(tmp_path):
    root = tmp_path / "DRCT_data"
    for i in range(2):
        png(root / "MSCOCO/val2017" / f"{i}.jpg", REAL_VALUE)
        for gen in ("sd-turbo", "sdxl-turbo"):
            png(root / "DRCT-2M" / gen / "val2017" / f"{i}.png", FAKE_VALUE)
    paired = load_drct2m(root)
    assert paired.groups == ["sd-turbo", "sdxl-turbo"]
    assert paired.summary()["per_group"]["sdxl-turbo"] == {"real": 2, "fake": 2}
    assert len({r.key for r in paired.records}) == len(paired.records) == 8
    once = load_drct2m(root, pair_reals=False)
    assert once.groups == ["MSCOCO", "sd-turbo", "sdxl-turbo"] and len(once.records) == 6


def test_load_deepfakebench_lists_left_out_frames_as_invalid(tmp_path):
    rgb = tmp_path / "rgb"
    png(rgb / "FF/real/frames/000/000.png", REAL_VALUE)
    png(rgb / "FF/fake/frames/000_003/000.png", FAKE_VALUE)
    data = {"FF-DF": {
        "FF-real": {"test": {"c23": {"000": {"label": "FF-real", "frames": ["FF/real/frames/000/000.png"]}}}},
        "FF-DF": {"test": {"c23": {"000_003": {"label": "FF-DF", "frames": ["FF/fake/frames/000_003/000.png",
                                                                             "FF/fake/frames/000_003/001.png"]}}}},
    }}
    (tmp_path / "FF-DF.json").write_text(json.dumps(data))
    bench = load_deepfakebench(tmp_path / "FF-DF.json", rgb)
    assert bench.groups == ["FF-DF"]
    assert [(r.key, r.label) for r in bench.records] == [
        ("FF-DF:test:FF/fake/frames/000_003/000.png", LABEL_FAKE), ("FF-DF:test:FF/real/frames/000/000.png", LABEL_REAL)]
    assert len(bench.invalid) == 1 and bench.invalid[0].startswith("missing_file")
    assert load_deepfakebench(tmp_path, rgb, datasets=["FF-DF"]).records == bench.records  # a folder of JSONs


def test_layout_benchmarks_by_name():
    assert LAYOUT_BENCHMARKS == {"genimage": load_genimage, "ufd": load_ufd, "drct2m": load_drct2m,
                                 "deepfakebench": load_deepfakebench, "diffusionforensics": load_diffusionforensics}


def test_layout_benchmark_scores_through_the_harness_per_group(tmp_path):
    bench = load_genimage(genimage(tmp_path / "GenImage"))

    def brightness(images):  # bright = fake; a perfect detector on this data
        return [float(np.asarray(im).mean() > 100) for im in images]

    detector = ProbabilityDetector(brightness, "brightness")
    run = score_benchmark(detector, bench.records, tmp_path / "out", "genimage", detector.describe())
    outputs = run.outputs
    assert [o["key"] for o in outputs] == [r.key for r in bench.records]
    scores = [o["p_fake"] for o in outputs]
    metrics = arforensics_metrics([o["label"] for o in outputs], head_predictions(scores),
                                  [o["group"] for o in outputs], scores=scores, generators=bench.groups)
    assert metrics["mean_acc"] == 1.0
    assert set(metrics["per_generator"]) == {"adm", "sdv4"}


def diffusionforensics(root):
    for split in ("train", "test"):
        for gen, value in (("real", REAL_VALUE), ("adm", FAKE_VALUE), ("sdv1", FAKE_VALUE)):
            for i in range(2):
                png(root / "images" / split / "imagenet" / gen / "n01440764" / f"{i}.png", value)
    return root


def test_load_diffusionforensics_labels_real_folders_real_and_pairs_on_request(tmp_path):
    root = diffusionforensics(tmp_path / "DiffusionForensics")
    bench = load_diffusionforensics(root)
    assert bench.name == "diffusionforensics" and all("test/" in r.key for r in bench.records)
    labels = {r.group: {x.label for x in bench.records if x.group == r.group} for r in bench.records}
    assert labels == {"imagenet/real": {LABEL_REAL}, "imagenet/adm": {LABEL_FAKE}, "imagenet/sdv1": {LABEL_FAKE}}
    paired = load_diffusionforensics(root, generators=["adm"], pair_reals=True)
    assert paired.groups == ["imagenet/adm"]
    assert sorted(r.label for r in paired.records) == [LABEL_REAL, LABEL_REAL, LABEL_FAKE, LABEL_FAKE]


def test_eval_diffusionforensics_command_scores_every_generator(tmp_path, capsys):
    from unigendet.cli import main
    from unigendet.detectors.base import build_detector

    root = diffusionforensics(tmp_path / "DF")
    build_detector("spectral", {"radial_bins": 8, "max_side": 8}).save_pretrained(tmp_path / "spectral")
    out = tmp_path / "out"
    assert main(["eval", "diffusionforensics", "--detector", "spectral", "--model", str(tmp_path / "spectral"),
                 "--root", str(root), "--pair-reals", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "diffusionforensics.json").read_text())
    assert set(report["metrics"]["head"]["per_generator"]) == {"imagenet/adm", "imagenet/sdv1"}
    assert main(["eval", "diffusionforensics", "--model", str(tmp_path / "spectral"), "--root", str(root),
                 f"detection.real_root={root}", "--dry-run"]) == 2
    assert "real_root applies to drct2m only" in capsys.readouterr().err
