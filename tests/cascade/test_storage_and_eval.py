"""A cascade directory: save -> load gives identical results, stage paths relative inside it, clear errors for a
missing or wrong stage; the cascade as ``model.detector: cascade`` in the harness and in ``eval compare`` (its row
plus the cascade table), and the ``cascade`` command end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cascade_stubs import genimage_tree, pattern_image

pytest.importorskip("sklearn")

from unigendet.cascade import CASCADE_FILE, CascadeConfig, Decision, load_cascade, save_cascade
from unigendet.cascade.config import Thresholds, VerifierConfig
from unigendet.cascade.storage import build_cascade, read_cascade_config
from unigendet.cli import main
from unigendet.config.loader import ConfigError
from unigendet.detectors.base import build_detector
from unigendet.evaluation.detectors import DetectorSource, load_image_detector
from unigendet.recipes import recipe_path

STUB = VerifierConfig(kind="stub_spectral_peak", stub_center=1.0, stub_width=0.25)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    """Stage 1: a fitted spectral detector with a coarse profile (any registered detector will do); stage 2: the
    tiny spectral detector, fitted; both saved with save_pretrained."""
    base = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(7)
    labels = [i % 2 for i in range(24)]
    images = [pattern_image(rng, bool(y)) for y in labels]
    binary = build_detector("spectral", {"max_side": 64, "radial_bins": 4, "init_seed": 3})
    binary.fit(images, labels, steps=30)
    binary.save_pretrained(base / "binary")
    spectral = build_detector("spectral", str(recipe_path("detectors/spectral_tiny.yaml")))
    spectral.fit(images, labels, steps=60)
    spectral.save_pretrained(base / "spectral")
    return base


def _config(stage_dirs, **more):
    settings = {"verifier": STUB, "thresholds": Thresholds(t1_binary_min=0.2, t2_spectral=0.3), "device": "cpu", **more}
    return CascadeConfig(binary=str(stage_dirs / "binary"), spectral=str(stage_dirs / "spectral"), **settings)


def _images(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [pattern_image(rng, i % 2 == 1) for i in range(n)]


def _comparable(results):
    return [{k: v for k, v in r.record().items() if k != "latency_ms"} for r in results]


def test_save_load_gives_identical_results_and_relative_paths(stage_dirs, tmp_path):
    config = _config(stage_dirs)
    images = _images()
    built = build_cascade(config).score(images)
    calibration = {"note": "hand-set"}
    save_cascade(tmp_path / "c", config, calibration, copy_stages=True)
    doc = json.loads((tmp_path / "c" / CASCADE_FILE).read_text())
    assert doc["format"] == "unigendet-cascade" and doc["version"] == 1 and doc["calibration"] == calibration
    assert doc["config"]["binary"] == "binary" and doc["config"]["spectral"] == "spectral"  # inside: relative
    assert doc["config"]["thresholds"]["t1_binary_min"] == 0.2
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "c", moved)  # a self-contained cascade directory can be moved
    loaded = load_cascade(moved)
    assert _comparable(loaded.score(images)) == _comparable(built)
    assert {r.stage_exited for r in built} >= {"binary", "mllm"}  # every stage took part
    assert loaded.calibration == calibration and loaded.directory == moved
    described = loaded.describe()
    assert described["binary"]["weights"] and described["spectral"]["weights"]
    assert described["verifier"]["kind"] == "stub_spectral_peak" and described["thresholds"]["t2_spectral"] == 0.3
    # stages outside the directory stay where they are, by absolute path
    save_cascade(tmp_path / "ref", config)
    assert read_cascade_config(tmp_path / "ref")[0].binary == str(stage_dirs / "binary")


def test_clear_errors_for_missing_or_wrong_stages(stage_dirs, tmp_path):
    with pytest.raises(ConfigError, match="not a saved cascade"):
        load_cascade(tmp_path)
    save_cascade(tmp_path / "c", _config(stage_dirs), copy_stages=True)
    shutil.rmtree(tmp_path / "c" / "spectral")
    with pytest.raises(ConfigError, match=r"cascade.json: config.spectral: .* does not exist"):
        load_cascade(tmp_path / "c")
    wrong = _config(stage_dirs)
    wrong.spectral = str(tmp_path)  # a directory without a saved detector
    with pytest.raises(ConfigError, match="cascade.spectral: .*not a saved detector"):
        build_cascade(wrong)
    (tmp_path / "c" / CASCADE_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ConfigError, match="expected 'unigendet-cascade'"):
        load_cascade(tmp_path / "c")


def test_cascade_through_the_detector_source(stage_dirs, tmp_path):
    save_cascade(tmp_path / "c", _config(stage_dirs))
    source = DetectorSource(path=str(tmp_path / "c"), detector="cascade", device="cpu")
    source.validate()
    source.check_inputs()
    detector = load_image_detector(source)
    [result] = detector.score(_images(1))
    assert result.decision in Decision
    with pytest.raises(ConfigError, match="holds a saved cascade; set model.detector: cascade"):
        DetectorSource(path=str(tmp_path / "c"), detector="spectral").check_inputs()
    with pytest.raises(ConfigError, match="not a saved cascade"):
        DetectorSource(path=str(stage_dirs / "binary"), detector="cascade").check_inputs()


def test_cascade_in_eval_compare_with_its_own_table_and_resume(stage_dirs, tmp_path, capsys):
    save_cascade(tmp_path / "c", _config(stage_dirs))
    root, out = genimage_tree(tmp_path / "GenImage", per_class=4), tmp_path / "reports"
    args = ["eval", "compare", "--detectors", f"casc=cascade:{tmp_path / 'c'}",
            f"spectral:{stage_dirs / 'spectral'}", "--benchmark", "genimage", "--root", str(root), "--out", str(out),
            "--batch-size", "4", "--device", "cpu"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert list(rows) == ["casc", "spectral"] and "cascade" not in rows["spectral"]
    work = out / "compare_genimage-casc.work" / "none" / "shard-00000-of-00001" / "outputs.jsonl"
    lines = [json.loads(s) for s in work.read_text().splitlines()]
    assert len(lines) == 16 and all(set(line["details"]) >= {"decision", "stage_exited", "latency_ms"}
                                    for line in lines)
    spectral_lines = (out / "compare_genimage-spectral.work" / "none" / "shard-00000-of-00001" / "outputs.jsonl")
    assert "details" not in json.loads(spectral_lines.read_text().splitlines()[0])
    casc = rows["casc"]["cascade"]
    assert casc["n"] == 16 and rows["casc"]["n"] == 16 and rows["casc"]["detector"] == "cascade"
    assert sum(casc["exits"].values()) == pytest.approx(1.0) and casc["reach"]["binary"] == 1.0
    # the row's p(fake) is the final score: its AUC is the cascade table's final-score AUC (pooled here, one check)
    md = (out / "compare_genimage.md").read_text()
    assert "cascade decisions, stages and latency" in md and "| casc |" in md.split("cascade decisions")[1]
    report = json.loads((out / "compare_genimage.json").read_text())
    assert report["metrics"]["casc"]["cascade"]["decisions"]["conservative"]["n"] == 16
    # resume: nothing rescored, the same rows (cascade metrics recomputed from the stored details)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == rows


def test_cascade_command_builds_calibrates_and_detect_uses_it(stage_dirs, tmp_path, capsys):
    val = genimage_tree(tmp_path / "val", per_class=6, seed=3)
    out = tmp_path / "casc"
    args = ["cascade", "--config", str(recipe_path("cascade/tiny.yaml")), "--binary", str(stage_dirs / "binary"),
            "--spectral", str(stage_dirs / "spectral"), "--out", str(out), "--benchmark", "genimage", "--root",
            str(val), "--binary-fnr", "0.1", "--copy-stages"]
    assert main([*args, "--dry-run"]) == 0
    assert "config valid" in capsys.readouterr().out and not out.exists()
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((out / CASCADE_FILE).read_text())["calibration"]
    assert record == printed["calibration"] and record["n_images"] == 24 and record["targets"]["binary_fnr"] == 0.1
    assert record["validation"]["benchmark"] == "genimage"
    assert printed["thresholds"] == record["thresholds"]
    binary_stage = next(stage for stage in record["stages"] if stage["stage"] == "binary")
    assert binary_stage["rate"] == "fnr" and binary_stage["achieved"] <= 0.1 and binary_stage["met"] is True
    image = tmp_path / "img.png"
    pattern_image(np.random.default_rng(0), True).save(image)
    assert main(["detect", str(image), "--detector", "cascade", "--model", str(out), "--device", "cpu", "--json"]) == 0
    [detected] = json.loads(capsys.readouterr().out)
    assert detected["decision"] in ("pass", "block", "escalate") and detected["stage_exited"] in (
        "binary", "spectral", "mllm")
    assert main(["detect", str(image), "--detector", "cascade", "--model", str(out), "--device", "cpu"]) == 0
    assert f"\t{detected['decision']} at {detected['stage_exited']}" in capsys.readouterr().out
    # bad input: a one-line error naming the key
    assert main(["cascade", "--binary", str(tmp_path / "missing"), "--spectral", str(stage_dirs / "spectral"),
                 "--out", str(out), "--verifier", "stub_spectral_peak", "--dry-run"]) == 2
    assert "cascade.binary" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random UniGenDet exported as a model directory, with small image transforms."""
    import yaml
    from helpers import tiny_config

    from unigendet.checkpoint.export import save_model_directory
    from unigendet.data.tokenizer import build_tiny_tokenizer
    from unigendet.inference.detect import DEFAULT_QUESTION
    from unigendet.models.unigendet import UniGenDet
    from unigendet.models.vae import FluxVAE

    torch.manual_seed(0)
    model = UniGenDet(tiny_config()).eval()
    vae = FluxVAE(tiny_config().vae)
    tokenizer = build_tiny_tokenizer(["This is a real image.", "This is a fake image.", DEFAULT_QUESTION] * 4,
                                     vocab_size=300)
    directory = tmp_path_factory.mktemp("casc_model") / "cascade" / "verifier"
    save_model_directory(directory, model, model.state_dict(), vae, tokenizer)
    small = {"vit_transform": (56, 28, 14), "vae_transform": (64, 32, 16)}
    data = {k: {"max_size": a, "min_size": b, "stride": c, "max_pixels": 10**6} for k, (a, b, c) in small.items()}
    (directory / "train_config.yaml").write_text(yaml.safe_dump({"data": {**data, "smsa": True}}))
    return directory


def test_unigendet_verifier_saved_inside_the_cascade(stage_dirs, tiny_model_dir):
    from unigendet.inference.loading import ModelSource, build_detector

    cascade_dir = tiny_model_dir.parent
    verifier = VerifierConfig(kind="unigendet", model=ModelSource(path=str(tiny_model_dir), device="cpu"),
                              max_new_tokens=3)
    config = _config(stage_dirs, verifier=verifier)
    config.thresholds = Thresholds(t1_binary_min=0.0, t2_spectral=0.0)  # every image reaches the verifier
    save_cascade(cascade_dir, config)
    doc = json.loads((cascade_dir / CASCADE_FILE).read_text())
    assert doc["config"]["verifier"]["model"]["path"] == "verifier"  # inside the cascade directory: relative
    cascade = load_cascade(cascade_dir)
    images = _images(3)
    results = cascade.score(images)
    direct = build_detector(tiny_model_dir, device="cpu").detect(images, max_new_tokens=3)
    assert [r.stage_exited for r in results] == ["mllm"] * 3
    assert [r.mllm_confidence for r in results] == pytest.approx([d.p_fake for d in direct], abs=1e-6)
    assert [r.explanation for r in results] == [d.text for d in direct]
    assert all(r.mllm_raw["source"] == "head" and r.latency_ms["mllm"] > 0 for r in results)
    assert cascade.describe()["verifier"]["weights"]  # the verifier's weights are part of the fingerprint
