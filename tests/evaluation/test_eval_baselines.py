"""Baseline detectors in the evaluation commands: ``--detector ltd --model DIR`` scores a tiny saved LTD through
the CLI on GenImage / DMimage layouts (head metrics only, the p(fake) the detector gives in-process, resumable),
a directory holding another detector is a one-line error, and ``detect`` prints p(fake) without explanation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from unigendet.cli import main
from unigendet.detectors.base import build_detector, load_detector
from unigendet.recipes import recipe_path

OUTPUTS = "outputs.jsonl"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ltd_dir(tmp_path_factory):
    """A tiny LTD (random frozen CLIP, random head) saved as a detector directory."""
    directory = tmp_path_factory.mktemp("ltd") / "ltd"
    build_detector("ltd", str(recipe_path("detectors/ltd_tiny.yaml"))).save_pretrained(directory)
    return directory


def png(path, seed, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def genimage(root):
    seed = 0
    for gen in ("adm", "sdv4"):
        for cls in ("ai", "nature"):
            for i in range(2):
                png(root / gen / "val" / cls / f"{i}.png", seed)
                seed += 1
    png(root / "adm" / "train" / "ai" / "t.png", 99)  # another split: not scored
    png(root / "adm" / "train" / "nature" / "t.png", 98)
    return root


def _outputs(work: object) -> list[dict]:
    return [json.loads(line) for line in (work / "shard-00000-of-00001" / OUTPUTS).read_text().splitlines()]


def test_ltd_scores_genimage_through_the_cli_with_head_metrics_only(ltd_dir, tmp_path, capsys):
    root, out = genimage(tmp_path / "GenImage"), tmp_path / "reports"
    args = ["eval", "genimage", "--detector", "ltd", "--model", str(ltd_dir), "--root", str(root), "--out", str(out),
            "--batch-size", "3", "--device", "cpu"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"head", "errors"}  # p(fake) only: no text metrics
    head = printed["head"]
    assert head["generators"] == ["adm", "sdv4"] and head["n"] == 8
    assert {g: v["n"] for g, v in head["per_generator"].items()} == {"adm": 4, "sdv4": 4}

    # Every output is the detector's own p(fake) for that image, read from the saved directory in-process.
    lines = _outputs(out / "genimage.work" / "none")
    detector = load_detector(ltd_dir)
    expected = detector.predict_proba([Image.open(root / line["key"]).convert("RGB") for line in lines])
    assert [line["p_fake"] for line in lines] == pytest.approx(expected, abs=1e-6)
    assert all(line["text"] is None for line in lines) and {line["label"] for line in lines} == {0, 1}

    report = json.loads((out / "genimage.json").read_text())
    identity = report["config"]["job"]["identity"]
    assert identity["detector"]["detector"] == "ltd"
    assert identity["detector"]["weights"] == detector.weights_fingerprint()
    assert report["headline"] == ["head.per_generator.adm.acc", "head.per_generator.sdv4.acc", "head.mean_acc"]
    md = (out / "genimage.md").read_text()
    assert "GenImage accuracy per generator" in md and "head: per generator" in md and "| **mean** |" in md
    assert (out / "genimage_roc.png").read_bytes()[:4] == b"\x89PNG"

    assert main(args) == 0  # complete: resumed, nothing rescored, same metrics
    assert json.loads(capsys.readouterr().out) == printed and len(_outputs(out / "genimage.work" / "none")) == 8


def test_ltd_scores_dmimage_through_the_cli(ltd_dir, tmp_path, capsys):
    root = tmp_path / "dm"
    png(root / "real_coco" / "a.png", 1)
    png(root / "real_coco" / "b.png", 2)
    png(root / "biggan" / "c.png", 3)
    out = tmp_path / "reports"
    assert main(["eval", "dmimage", "--detector", "ltd", "--model", str(ltd_dir), "--root", str(root), "--out",
                 str(out), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"head", "errors"} and printed["head"]["n"] == 3
    assert list(printed["head"]["per_generator"]) == ["biggan"]
    assert "DMimage (paper layout)" in (out / "dmimage.md").read_text()


def test_a_directory_of_another_detector_is_a_one_line_error(ltd_dir, tmp_path, capsys):
    root = genimage(tmp_path / "GenImage")
    base = ["eval", "genimage", "--model", str(ltd_dir), "--root", str(root), "--out", str(tmp_path / "o")]
    assert main([*base, "--detector", "spectral"]) == 2
    err = capsys.readouterr().err
    assert err == (f"unigendet: error: model.path: {ltd_dir} holds a saved 'ltd' detector, not 'spectral' "
                   "(model.detector)\n")
    assert main(base) == 2  # the default detector is our model: the directory says which one it holds
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds a saved 'ltd' detector; set model.detector: ltd" in err
    assert main([*base, "--detector", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown detector 'nope'; known: unigendet, " in err  # other tests may register more detectors
    assert all(name in err for name in ("corit", "craft", "ltd", "resnet", "spectral", "cascade"))
    assert main([*base, "--detector", "ltd", "--no-smsa"]) == 2  # our model's options do not apply
    assert "detector.smsa" in capsys.readouterr().err
    assert main([*base, "--detector", "ltd", "--dtype", "bf16"]) == 2
    assert "model.dtype" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was scored


def test_a_root_of_another_layout_is_a_one_line_error(ltd_dir, tmp_path, capsys):
    root = genimage(tmp_path / "GenImage")
    assert main(["eval", "ufd", "--detector", "ltd", "--model", str(ltd_dir), "--root", str(root), "--out",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("unigendet: error: UniversalFakeDetect: ")
    assert "expected [{train,val,test}/]<subset>/{0_real,1_fake}/" in err


def test_detect_with_a_baseline_prints_p_fake_and_verdict_only(ltd_dir, tmp_path, capsys):
    png(tmp_path / "a.png", 5)
    png(tmp_path / "b.png", 6)
    images = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert main(["detect", *images, "--detector", "ltd", "--model", str(ltd_dir), "--json", "--device", "cpu"]) == 0
    records = json.loads(capsys.readouterr().out)
    expected = load_detector(ltd_dir).predict_proba([Image.open(p).convert("RGB") for p in images])
    assert [r["p_fake"] for r in records] == pytest.approx(expected, abs=1e-6)
    assert [r["label"] for r in records] == ["fake" if p >= 0.5 else "real" for p in expected]
    assert all(r["explanation"] is None and r["text_label"] is None for r in records)
    assert main(["detect", *images, "--detector", "ltd", "--model", str(ltd_dir), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == f"{images[0]}\t{records[0]['label']}\tp_fake={records[0]['p_fake']:.4f}"


def test_baselines_take_the_auto_dtype_and_refuse_quantization():
    from unigendet.config.loader import ConfigError, from_dict
    from unigendet.evaluation.detectors import DetectorSource

    assert from_dict(DetectorSource, {"path": "x", "detector": "ltd"}).dtype == "auto"  # fp32 for a baseline
    with pytest.raises(ConfigError, match="dtype: baseline detectors run in fp32; 'bf16'"):
        from_dict(DetectorSource, {"path": "x", "detector": "ltd", "dtype": "bf16"})
    with pytest.raises(ConfigError, match="quantize: '8bit' applies to unigendet only"):
        DetectorSource(path="x", detector="ltd", quantize="8bit").validate()
