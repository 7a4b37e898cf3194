"""``eval compare``: several detectors on one split, each its own resumable job, one report (table with every column,
one ROC plot with every detector's curve), and the published figures shown only where the split matches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.folders import checkerboard_image
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from matplotlib.figure import Figure

from unigendet.cli import main
from unigendet.config.loader import from_dict
from unigendet.detectors.adapter import DetectorAdapter
from unigendet.detectors.base import build_detector, load_detector
from unigendet.evaluation.benchmarks import ARFORENSICS_GENERATORS, Benchmark
from unigendet.evaluation.compare import CompareConfig, job_perf, record_perf, reported_figures
from unigendet.evaluation.fakeclue import FakeClueEvalConfig
from unigendet.evaluation.jobs import DetectionEvalConfig
from unigendet.metrics.detection import arforensics_metrics, head_predictions
from unigendet.recipes import recipe_path

HEADER = ("| detector | kind | Acc | real Acc | fake Acc | AP | AUC | text Acc | images/s | peak memory | n | "
          "reported |")


pytestmark = pytest.mark.usefixtures("single_thread")


def genimage(root, generators=("ADM", "Midjourney"), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for gen in generators:
        for cls in ("ai", "nature"):
            for i in range(per_class):
                path = root / gen / "val" / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                checkerboard_image(rng, cls == "ai").save(path)
    return root


@pytest.fixture(scope="module")
def detector_dirs(tmp_path_factory):
    """A tiny LTD (random) and a tiny spectral detector fitted on other images of the same kind, saved."""
    base = tmp_path_factory.mktemp("detectors")
    build_detector("ltd", str(recipe_path("detectors/ltd_tiny.yaml"))).save_pretrained(base / "ltd")
    spectral = build_detector("spectral", str(recipe_path("detectors/spectral_tiny.yaml")))
    rng = np.random.default_rng(123)
    labels = [i % 2 for i in range(24)]
    spectral.fit([checkerboard_image(rng, bool(y)) for y in labels], labels, steps=100)
    spectral.save_pretrained(base / "spectral")
    return {"ltd": base / "ltd", "spectral": base / "spectral"}


def _row_cells(md: str, name: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


class ScoreCounter:
    """Counts DetectorAdapter.score calls (the baselines' scoring) while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = DetectorAdapter.score

        def counted(adapter, images, questions=None):
            self.calls += 1
            return original(adapter, images, questions)

        monkeypatch.setattr(DetectorAdapter, "score", counted)


class FigureSpy:
    """Records every matplotlib Figure saved, to look at what was drawn."""

    def __init__(self, monkeypatch):
        self.saved: dict[str, Figure] = {}
        original = Figure.savefig

        def spy(fig, path, *args, **kwargs):
            self.saved[str(path)] = fig
            return original(fig, path, *args, **kwargs)

        monkeypatch.setattr(Figure, "savefig", spy)


def test_compare_two_detectors_one_table_one_roc_plot_and_resume(detector_dirs, tmp_path, capsys, monkeypatch):
    root, out = genimage(tmp_path / "GenImage"), tmp_path / "reports"
    ltd, spectral = detector_dirs["ltd"], detector_dirs["spectral"]
    args = ["eval", "compare", "--detectors", f"ltd:{ltd}", f"spec=spectral:{spectral}", "--benchmark", "genimage",
            "--root", str(root), "--out", str(out), "--batch-size", "4", "--device", "cpu"]
    counter, figures = ScoreCounter(monkeypatch), FigureSpy(monkeypatch)
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["ltd", "spec"] and counter.calls == 2 * 3  # 12 images in batches of 4, per detector

    # Each detector is its own harness job; its row is computed from that job's outputs.
    for name, directory in (("ltd", ltd), ("spec", spectral)):
        work = out / f"compare_genimage-{name}.work" / "none"
        lines = [json.loads(s) for s in (work / "shard-00000-of-00001" / "outputs.jsonl").read_text().splitlines()]
        assert len(lines) == 12
        expected = load_detector(directory).predict_proba([Image.open(root / o["key"]) for o in lines])
        assert [o["p_fake"] for o in lines] == pytest.approx(expected, abs=1e-6)
        labels, groups, scores = [o["label"] for o in lines], [o["group"] for o in lines], expected
        metrics = arforensics_metrics(labels, head_predictions(scores), groups, scores=scores)
        row = printed[name]
        assert row["acc"] == pytest.approx(metrics["mean_acc"]) and row["ap"] == pytest.approx(metrics["mean_ap"])
        assert row["auc"] == pytest.approx(metrics["mean_auc"]) and row["n"] == 12
        assert row["real_acc"] == pytest.approx(metrics["real_acc"]) and row["text_acc"] is None
        assert row["images_per_s"] > 0 and row["perf"]["timed_images"] == 12 and row["perf"]["peak_rss_bytes"] > 0
        assert "MiB (RSS, +" in row["peak_memory"] and row["perf"]["device"] == "cpu"
    assert printed["spec"]["auc"] > 0.9  # the fitted spectral detector finds the checkerboard

    md = (out / "compare_genimage.md").read_text()
    assert HEADER in md
    ltd_cells, spec_cells = _row_cells(md, "ltd"), _row_cells(md, "spec")
    assert ltd_cells[1] == "ltd" and spec_cells[1] == "spectral"
    assert all(cell not in ("", "N/A") for cell in ltd_cells[:7] + ltd_cells[8:11])  # every measured column filled
    assert ltd_cells[7] == "N/A"  # no explanations, no text Acc
    # The split is GenImage val, whole: LTD's published figures apply; none exist for the spectral detector.
    assert ltd_cells[-1] == "Acc 91.62 · AP 97.17 [1]" and spec_cells[-1] == "—"
    assert "[1] LTD paper (CVPR 2026)" in md
    report = json.loads((out / "compare_genimage.json").read_text())
    assert report["metrics"]["ltd"]["reported_figures"][0]["figures"] == {"acc": 91.62, "ap": 97.17}
    assert set(report["config"]["jobs"]) == {"ltd", "spec"}

    # One ROC plot holding both detectors' curves.
    roc = out / "compare_genimage_roc.png"
    assert roc.read_bytes()[:4] == b"\x89PNG" and "compare_genimage_roc.png" in md
    [axes] = figures.saved[str(roc)].axes
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert len(axes.get_lines()) == 3  # chance diagonal + two curves
    assert legend[0].startswith("ltd (AUC ") and legend[1].startswith("spec (AUC ")

    # Resume: every job is complete, nothing is scored again, the same rows come back.
    counter.calls = 0
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert counter.calls == 0 and again == printed

    # merge keeps working on a comparison report
    assert main(["eval", "merge", str(out / "compare_genimage.json")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | ltd.acc | ltd.auc | spec.acc | spec.auc |")


def test_each_detector_is_its_own_job(detector_dirs, tmp_path, capsys, monkeypatch):
    root, out = genimage(tmp_path / "GenImage", per_class=2), tmp_path / "reports"
    base = ["eval", "compare", "--benchmark", "genimage", "--root", str(root), "--out", str(out), "--name", "c",
            "--device", "cpu"]
    counter = ScoreCounter(monkeypatch)
    assert main([*base, "--detectors", f"ltd:{detector_dirs['ltd']}"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert counter.calls == 1
    counter.calls = 0
    assert main([*base, "--detectors", f"ltd:{detector_dirs['ltd']}", f"spectral:{detector_dirs['spectral']}"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert counter.calls == 1  # only the detector added to the comparison scored
    assert list(rows) == ["ltd", "spectral"] and rows["ltd"] == first["ltd"]


def test_reported_column_only_where_the_split_matches(detector_dirs, tmp_path, capsys):
    root, out = genimage(tmp_path / "GenImage", per_class=1), tmp_path / "reports"
    args = ["eval", "compare", "--detectors", f"ltd:{detector_dirs['ltd']}", "--benchmark", "genimage", "--root",
            str(root), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--limit-per-group", "1", "--name", "limited"]) == 0  # a subsample: not the paper's split
    assert json.loads(capsys.readouterr().out)["ltd"]["reported"] == "—"
    assert "no published figure" in (out / "limited.md").read_text()
    assert main([*args, "--generators", "Midjourney", "--name", "mj"]) == 0  # the Midjourney subset alone
    assert json.loads(capsys.readouterr().out)["ltd"]["reported"] == "Acc 62.97 [1]"


def _benchmark(name: str, groups: list[str]) -> Benchmark:
    return Benchmark(name, "/data", [], groups=groups)


def test_reported_figures_match_benchmark_split_and_groups():
    genimage = DetectionEvalConfig(benchmark="genimage", root="/data")
    whole = _benchmark("genimage", ["ADM", "BigGAN", "Midjourney"])
    [fig] = reported_figures("ltd", genimage, whole)
    assert fig.figures == {"acc": 91.62, "ap": 97.17}
    assert reported_figures("spectral", genimage, whole) == []
    assert reported_figures("corit", genimage, whole) == []
    for changed in (dict(split="train"), dict(limit_per_group=5), dict(setting="jpeg70"), dict(groups=["ADM"])):
        cfg = DetectionEvalConfig(benchmark="genimage", root="/data", **changed)
        assert reported_figures("ltd", cfg, _benchmark("genimage", changed.get("groups", whole.groups))) == []
    midjourney = DetectionEvalConfig(benchmark="genimage", root="/data", groups=["Midjourney"])
    assert [f.figures for f in reported_figures("ltd", midjourney, _benchmark("genimage", ["Midjourney"]))] == [
        {"acc": 62.97}]

    ufd_subsets = ["progan", "cyclegan", "biggan", "stylegan", "gaugan", "stargan", "deepfake", "seeingdark", "san",
                   "crn", "imle", "guided", "ldm_200", "ldm_200_cfg", "ldm_100", "glide_100_27", "glide_50_27",
                   "glide_100_10", "dalle"]
    ufd = DetectionEvalConfig(benchmark="ufd", root="/data")
    assert [f.figures for f in reported_figures("corit", ufd, _benchmark("ufd", ufd_subsets))] == [
        {"acc": 89.84, "ap": 97.17}]
    assert reported_figures("ltd", ufd, _benchmark("ufd", ufd_subsets)) == []  # LTD used another subset list
    ltd_subsets = [s for s in ufd_subsets if s not in ("seeingdark", "san", "crn", "imle")] + ["stylegan2"]
    assert [f.figures for f in reported_figures("ltd", ufd, _benchmark("ufd", ltd_subsets))] == [
        {"acc": 96.90, "ap": 99.51}]
    one = DetectionEvalConfig(benchmark="ufd", root="/data", groups=["san"])
    assert [f.figures for f in reported_figures("corit", one, _benchmark("ufd", ["san"]))] == [
        {"acc": 59.36, "ap": 65.89}]

    arf = DetectionEvalConfig(benchmark="arforensics", root="/data")
    [fig] = reported_figures("unigendet", arf, _benchmark("arforensics", list(ARFORENSICS_GENERATORS)))
    assert fig.figures == {"acc": 98.1}
    janus = DetectionEvalConfig(benchmark="arforensics", root="/data", groups=["Janus_Pro"])
    assert [f.figures for f in reported_figures("unigendet", janus, _benchmark("arforensics", ["janus-pro"]))] == [
        {"acc": 99.7}]
    fakeclue = FakeClueEvalConfig(json_path="test.json", image_root="/data")
    [fig] = reported_figures("unigendet", fakeclue, _benchmark("fakeclue", ["all"]))
    assert fig.figures == {"acc": 98.0, "f1": 97.7}
    fakeclue.limit = 10
    assert reported_figures("unigendet", fakeclue, _benchmark("fakeclue", ["all"])) == []


def test_perf_totals_add_up_per_job_and_reset_for_another_job(tmp_path):
    memory = {"peak_rss_bytes": 100, "peak_cuda_bytes": None, "rss_method": "VmHWM", "device": "cpu"}
    path = tmp_path / "perf" / "shard-00000-of-00001.json"
    record_perf(path, "job-a", images=4, seconds=2.0, memory=memory)
    record_perf(path, "job-a", images=6, seconds=3.0, memory={**memory, "peak_rss_bytes": 80})
    perf = job_perf(tmp_path, 1, "job-a")
    assert perf["images_per_s"] == 2.0 and perf["timed_images"] == 10 and perf["peak_rss_bytes"] == 100
    assert math.isnan(job_perf(tmp_path, 1, "job-b")["images_per_s"])  # measured for another job: not counted
    record_perf(path, "job-b", images=3, seconds=1.0, memory=memory)
    assert job_perf(tmp_path, 1, "job-b")["timed_images"] == 3


def test_compare_config_checks_entries():
    base = {"benchmark": "genimage", "root": "/data"}
    entry = {"name": "a", "model": {"detector": "ltd", "path": "/m"}}
    with pytest.raises(ValueError, match="names must differ"):
        from_dict(CompareConfig, {"base": base, "detectors": [entry, entry]})
    with pytest.raises(ValueError, match="decoding and max_new_tokens apply to unigendet only"):
        from_dict(CompareConfig, {"base": base, "detectors": [{**entry, "max_new_tokens": 3}]})
    with pytest.raises(ValueError, match="letters, digits"):
        from_dict(CompareConfig, {"base": base, "detectors": [{**entry, "name": "a/b"}]})
    cfg = from_dict(CompareConfig, {"base": base, "detectors": [entry, {"name": "ours", "model": {"path": "/u"}}]})
    assert cfg.name == "compare_genimage" and cfg.detectors[1].model.is_unigendet
