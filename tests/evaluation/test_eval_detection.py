"""DMimage / ARForensics evaluation: loaders on synthetic on-disk layouts, metrics against scikit-learn, the
sharded resumable harness (kill + resume, shards, fingerprints), reports, and the CLI on a tiny real model."""

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    recall_score,
    roc_auc_score,
)

from unigendet.data.quality import BadSample
from unigendet.evaluation.benchmarks import (
    BenchmarkError,
    load_arforensics,
    load_dmimage,
    load_fakeclue,
)
from unigendet.evaluation.detectors import (
    ProbabilityDetector,
    UniGenDetImageDetector,
)
from unigendet.evaluation.harness import (
    COMPLETE_FILE,
    OUTPUTS_FILE,
    IncompleteJobError,
    JobMismatchError,
    NoScorableImagesError,
    ShardSpec,
    parse_shard,
    resolve_shard,
    shard_dirname,
)
from unigendet.evaluation.jobs import DetectionEvalConfig, run_detection_eval
from unigendet.labels import DetectionResult, parse_verdict
from unigendet.metrics import jsonable, merge_reports
from unigendet.metrics.detection import (
    arforensics_metrics,
    dmimage_metrics,
    head_predictions,
)

REAL, FAKE = 0, 1
REAL_TEXT, FAKE_TEXT = "This is a real image. Natural light.", "This is a fake image. Odd hands."


# --------------------------------------------------------------------------------------------------
# Scripted detector and synthetic layouts


class Killed(Exception):
    """Stands in for the job being killed mid-run."""


class ScriptedDetector:
    """An ImageDetector answering from a script keyed by image width; counts what it scores."""

    def __init__(self, script, version=1, die_after_batches=None, reject_width=None):
        self.script = script
        self.version = version
        self.die_after_batches = die_after_batches
        self.reject_width = reject_width
        self.batches = 0
        self.scored = []  # widths, in scoring order
        self.images = []
        self.questions = []

    def describe(self):
        return {"detector": "scripted", "version": self.version}

    def score(self, images, questions=None):
        if self.die_after_batches is not None and self.batches >= self.die_after_batches:
            raise Killed
        if self.reject_width is not None and any(im.width == self.reject_width for im in images):
            raise BadSample("too_long", f"width {self.reject_width} is too large for the context")
        self.batches += 1
        self.scored += [im.width for im in images]
        self.images += list(images)
        self.questions += list(questions or [None] * len(images))
        outs = []
        for im in images:
            p, text = self.script[im.width]
            outs.append(DetectionResult(p, text, None if text is None else parse_verdict(text)))
        return outs


def _png(path, width, height=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed * 1000 + width)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


# width -> (folder, p_fake, text); labels follow the folder.
DM_LAYOUT = {
    10: ("real_coco_valid", 0.1, REAL_TEXT),    # head right, text right
    11: ("real_coco_valid", 0.7, REAL_TEXT),    # head wrong, text right
    12: ("real_coco_valid", 0.2, "no idea"),    # head right, text unparsed
    13: ("real_ucid", 0.4, FAKE_TEXT),          # head right, text wrong
    20: ("biggan_256", 0.9, FAKE_TEXT),         # right, right
    21: ("biggan_256", 0.3, FAKE_TEXT),         # head wrong, text right
    22: ("biggan_256", 0.8, "hmm"),             # head right, text unparsed
    30: ("dalle_2", 0.6, REAL_TEXT),            # head right, text wrong
    31: ("dalle_2", 0.5, FAKE_TEXT),            # head right (>= 0.5), text right
}


def make_dmimage(root):
    for width, (folder, _, _) in DM_LAYOUT.items():
        _png(root / folder / f"img_{width}.png", width)
    (root / "dalle_2" / "broken.png").write_bytes(b"not an image at all")  # unreadable: counted, not fatal
    (root / "dalle_2" / "operations.csv").write_text("x")  # not an image: ignored
    return {w: (p, t) for w, (_, p, t) in DM_LAYOUT.items()}


def _dm_expected():
    labels = [REAL if "real" in f else FAKE for f, _, _ in DM_LAYOUT.values()]
    groups = [f for f, _, _ in DM_LAYOUT.values()]
    p_fake = [p for _, p, _ in DM_LAYOUT.values()]
    text = [parse_verdict(t) for _, _, t in DM_LAYOUT.values()]
    return labels, groups, p_fake, text


ARF_LAYOUT = {  # width -> (generator, class dir, p_fake, text)
    40: ("VAR", "0_real", 0.2, REAL_TEXT), 41: ("VAR", "1_fake", 0.9, FAKE_TEXT),
    42: ("VAR", "1_fake", 0.4, "unsure"),
    50: ("LlamaGen", "0_real", 0.6, REAL_TEXT), 51: ("LlamaGen", "0_real", 0.55, FAKE_TEXT),
    52: ("LlamaGen", "1_fake", 0.7, FAKE_TEXT),
}


def make_arforensics(root):
    for width, (gen, cls, _, _) in ARF_LAYOUT.items():
        _png(root / "test" / gen / cls / f"{width}.png", width)
    return {w: (p, t) for w, (_, _, p, t) in ARF_LAYOUT.items()}


def _cfg(tmp_path, root, benchmark="dmimage", **kw):
    return DetectionEvalConfig(benchmark=benchmark, root=str(root), out_dir=str(tmp_path / "out"), batch_size=2, **kw)


def _same(a, b, ignore=()):
    """Equal as JSON (NaN-safe), leaving out top-level ``ignore`` keys."""
    def strip(d):
        return {k: v for k, v in d.items() if k not in ignore}

    return json.dumps(jsonable(strip(a)), sort_keys=True) == json.dumps(jsonable(strip(b)), sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Metrics against scikit-learn


def _random_case(seed, n=300, groups=("real_a", "real_b", "gen_x", "gen_y", "gen_z")):
    rng = random.Random(seed)
    g = [rng.choice(groups) for _ in range(n)]
    y = [REAL if grp.startswith("real") else FAKE for grp in g]
    p = [rng.choice([REAL, FAKE, FAKE if lab else REAL, None]) for lab in y]
    return y, p, g


@pytest.mark.parametrize("seed", [0, 1])
def test_dmimage_metrics_match_sklearn(seed):
    y, p, g = _random_case(seed)
    m = dmimage_metrics(y, p, g, unparsed="exclude")
    yk = [a for a, b in zip(y, p) if b is not None]
    pk = [b for b in p if b is not None]
    assert m["n_unparsed"] == p.count(None) > 0
    assert math.isclose(m["overall_acc"], accuracy_score(yk, pk))
    assert math.isclose(m["overall_f1"], f1_score(yk, pk, pos_label=REAL))  # binary F1, real positive
    assert math.isclose(m["f1_macro"], f1_score(yk, pk, average="macro"))
    assert math.isclose(m["balanced_acc"], balanced_accuracy_score(yk, pk))
    assert math.isclose(m["real_acc"], recall_score(yk, pk, pos_label=REAL))
    assert math.isclose(m["fake_acc"], recall_score(yk, pk, pos_label=FAKE))
    reals = [(a, b) for a, b in zip(yk, pk) if a == REAL]
    fakes = [(a, b) for a, b in zip(yk, pk) if a == FAKE]
    assert math.isclose(m["real_f1"], f1_score(*zip(*reals), pos_label=REAL))  # F1 on the real-only subset
    assert math.isclose(m["fake_f1"], f1_score(*zip(*fakes), pos_label=FAKE))
    # Per generator: its fakes against every real image.
    gk = [c for c, b in zip(g, p) if b is not None]
    for gen in ("gen_x", "gen_y", "gen_z"):
        idx = [i for i, c in enumerate(gk) if c == gen or c.startswith("real")]
        sub_y, sub_p = [yk[i] for i in idx], [pk[i] for i in idx]
        got = m["per_generator"][gen]
        assert math.isclose(got["overall_acc"], accuracy_score(sub_y, sub_p))
        assert math.isclose(got["overall_f1"], f1_score(sub_y, sub_p, pos_label=REAL))
        assert math.isclose(got["balanced_acc"], balanced_accuracy_score(sub_y, sub_p))
        assert got["n_unparsed"] == sum(1 for c, b in zip(g, p) if c == gen and b is None)
    assert set(m["per_real_source"]) == {"real_a", "real_b"}
    for key in ("fake_acc", "overall_f1"):
        assert math.isclose(m["mean_over_generators"][key], np.mean([m["per_generator"][x][key] for x in
                                                                      ("gen_x", "gen_y", "gen_z")]))


def test_dmimage_unparsed_as_wrong_and_f1_formula():
    y, p, g = _random_case(3)
    m = dmimage_metrics(y, p, g, unparsed="wrong")
    pw = [1 - a if b is None else b for a, b in zip(y, p)]
    assert m["n"] == len(y) and m["n_unparsed"] == p.count(None)
    assert math.isclose(m["overall_acc"], accuracy_score(y, pw))
    assert math.isclose(m["overall_f1"], f1_score(y, pw, pos_label=REAL))
    # Paper anchors: Real Acc 99.0 -> Real F1 99.5; Fake Acc 97.2 -> 98.6.
    m = dmimage_metrics([REAL] * 100 + [FAKE] * 1000, [REAL] * 99 + [FAKE] + [FAKE] * 972 + [REAL] * 28,
                        ["real"] * 100 + ["gen"] * 1000)
    assert round(100 * m["real_f1"], 1) == 99.5 and round(100 * m["fake_f1"], 1) == 98.6


def test_dmimage_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="lengths must match"):
        dmimage_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="internal"):
        dmimage_metrics([0, 2], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="unparsed must be"):
        dmimage_metrics([0, 1], [0, 1], ["a", "b"], unparsed="drop")


def test_arforensics_metrics_match_sklearn():
    rng = random.Random(5)
    gens = ["LlamaGen", "VAR", "RAR"]
    g = [rng.choice(gens) for _ in range(240)]
    y = [rng.randint(0, 1) for _ in g]
    s = [min(1.0, max(0.0, 0.5 * lab + rng.random() * 0.6)) for lab in y]
    preds = head_predictions(s)
    m = arforensics_metrics(y, preds, g, scores=s, generators=gens)
    for gen in gens:
        idx = [i for i, c in enumerate(g) if c == gen]
        sub_y, sub_p, sub_s = [y[i] for i in idx], [preds[i] for i in idx], [s[i] for i in idx]
        got = m["per_generator"][gen]
        assert math.isclose(got["acc"], accuracy_score(sub_y, sub_p))
        assert math.isclose(got["auc"], roc_auc_score(sub_y, sub_s))
        assert math.isclose(got["ap"], average_precision_score(sub_y, sub_s))
    assert math.isclose(m["mean_acc"], np.mean([m["per_generator"][x]["acc"] for x in gens]))
    assert math.isclose(m["acc"], accuracy_score(y, preds))
    assert m["generators"] == gens
    # Text verdicts with unparsed answers: excluded vs counted wrong.
    text = [None if i % 7 == 0 else p for i, p in enumerate(preds)]
    excl, wrong = arforensics_metrics(y, text, g), arforensics_metrics(y, text, g, unparsed="wrong")
    kept = [i for i, t in enumerate(text) if t is not None]
    assert math.isclose(excl["acc"], accuracy_score([y[i] for i in kept], [text[i] for i in kept]))
    assert math.isclose(wrong["acc"], accuracy_score(y, [1 - a if t is None else t for a, t in zip(y, text)]))
    assert excl["n_unparsed"] == wrong["n_unparsed"] == len(text) - len(kept)


def test_head_predictions_threshold_and_nan():
    assert head_predictions([0.5, 0.49, 0.9, math.nan]) == [FAKE, REAL, FAKE, None]


# --------------------------------------------------------------------------------------------------
# Loaders


def test_dmimage_loader_layout_and_errors(tmp_path):
    root = tmp_path / "dm"
    make_dmimage(root)
    bench = load_dmimage(root)
    assert len(bench.records) == len(DM_LAYOUT) + 1  # + broken.png (counted when scoring), csv ignored
    by_key = {r.key: r for r in bench.records}
    assert by_key["real_ucid/img_13.png"].label == REAL and by_key["biggan_256/img_20.png"].label == FAKE
    assert by_key["dalle_2/img_30.png"].group == "dalle_2"
    assert [r.key for r in bench.records] == sorted(r.key for r in bench.records)

    with pytest.raises(BenchmarkError, match="does not exist"):
        load_dmimage(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(BenchmarkError, match="no sub-folders"):
        load_dmimage(tmp_path / "flat")
    (tmp_path / "empty" / "real_x").mkdir(parents=True)
    (tmp_path / "empty" / "gen_y").mkdir()
    with pytest.raises(BenchmarkError, match="no images found"):
        load_dmimage(tmp_path / "empty")
    make_arforensics(tmp_path / "arf")
    with pytest.raises(BenchmarkError, match="ARForensics layout"):
        load_dmimage(tmp_path / "arf" / "test")


def test_arforensics_loader_layouts_and_errors(tmp_path):
    root = tmp_path / "arf"
    make_arforensics(root)
    bench = load_arforensics(root)
    assert bench.groups == ["LlamaGen", "VAR"]  # paper column order
    assert {r.key: r.label for r in bench.records}["VAR/0_real/40.png"] == REAL
    assert sum(r.label for r in bench.records) == 3
    assert [r.key for r in load_arforensics(root / "test").records] == [r.key for r in bench.records]
    assert load_arforensics(root, generators=["VAR"]).groups == ["VAR"]
    with pytest.raises(BenchmarkError, match=r"generator\(s\) \['Switti'\]"):
        load_arforensics(root, generators=["Switti"])
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_arforensics(tmp_path / "missing")
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="no test/ directory"):
        load_arforensics(tmp_path / "other")
    (root / "test" / "VAR" / "0_real").rename(tmp_path / "split_0_real")
    (tmp_path / "split" / "1_fake").mkdir(parents=True)
    (tmp_path / "split_0_real").rename(tmp_path / "split" / "0_real")
    with pytest.raises(BenchmarkError, match="train/val split"):
        load_arforensics(tmp_path / "split")
    (root / "test" / "Odd" / "images").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="neither 0_real/ nor 1_fake/"):
        load_arforensics(root)


def test_fakeclue_loader_counts_invalid_entries(tmp_path):
    entry = {"image": "a.png", "label": 1, "cate": "doc", "conversations": [
        {"from": "human", "value": "<image>\nReal?"}, {"from": "gpt", "value": REAL_TEXT}]}
    (tmp_path / "t.json").write_text(json.dumps([entry, {"label": 0}, dict(entry, label=7)]))
    bench = load_fakeclue(tmp_path / "t.json", tmp_path)
    assert len(bench.records) == 1 and len(bench.invalid) == 2
    rec = bench.records[0]
    assert (rec.label, rec.group, rec.question, rec.reference) == (REAL, "doc", "\nReal?", REAL_TEXT)
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(BenchmarkError, match="no entries"):
        load_fakeclue(tmp_path / "e.json", tmp_path)


# --------------------------------------------------------------------------------------------------
# Jobs: exact metrics, errors, reports


def test_dmimage_job_scores_head_and_text_exactly(tmp_path):
    root = tmp_path / "dm"
    det = ScriptedDetector(make_dmimage(root))
    metrics = run_detection_eval(det, _cfg(tmp_path, root, question="Real?"))
    labels, groups, p_fake, text = _dm_expected()
    expected_head = dmimage_metrics(labels, head_predictions(p_fake), groups, scores=p_fake)
    assert _same(metrics["head"], expected_head, ignore=("notes",))
    assert _same(metrics["text"], dmimage_metrics(labels, text, groups))
    assert _same(metrics["text_unparsed_as_wrong"], dmimage_metrics(labels, text, groups, unparsed="wrong"))
    assert metrics["text"]["n_unparsed"] == 2 and metrics["head"]["n"] == 9
    assert math.isclose(metrics["head"]["auc"], roc_auc_score(labels, p_fake))
    # The unreadable file is counted and reported, not fatal and not scored.
    assert metrics["errors"]["n_errors"] == 1 and metrics["errors"]["by_reason"] == {"unreadable_image": 1}
    assert sorted(det.scored) == sorted(DM_LAYOUT) and set(det.questions) == {"Real?"}

    out = tmp_path / "out"
    report = json.loads((out / "dmimage.json").read_text())
    assert report["config"]["dataset"]["n_records"] == 10 and report["config"]["weights_sha256"] is None
    assert report["config"]["job"]["identity"]["detector"] == det.describe() and "versions" in report["config"]
    assert report["headline"][:2] == ["text.real_acc", "text.real_f1"]
    md = (out / "dmimage.md").read_text()
    assert "DMimage (paper layout)" in md and "| biggan_256 |" in md and "dmimage_text_per_generator.png" in md
    for png in ("dmimage_roc.png", "dmimage_text_per_generator.png", "dmimage_head_per_generator.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_arforensics_job_per_generator_and_mean(tmp_path):
    root = tmp_path / "arf"
    metrics = run_detection_eval(ScriptedDetector(make_arforensics(root)), _cfg(tmp_path, root, "arforensics"))
    head, text = metrics["head"], metrics["text"]
    assert head["generators"] == ["LlamaGen", "VAR"]
    assert head["per_generator"]["VAR"]["acc"] == 2 / 3 and head["per_generator"]["LlamaGen"]["acc"] == 1 / 3
    assert math.isclose(head["mean_acc"], 0.5)
    assert text["per_generator"]["VAR"]["acc"] == 1.0 and text["per_generator"]["VAR"]["n_unparsed"] == 1
    assert text["per_generator"]["LlamaGen"]["acc"] == 2 / 3
    assert metrics["text_unparsed_as_wrong"]["per_generator"]["VAR"]["acc"] == 2 / 3
    md = (tmp_path / "out" / "arforensics.md").read_text()
    assert "| mode | LlamaGen | VAR | Mean |" in md and "| head | 33.33 | 66.67 | 50.00 |" in md


def test_score_only_baseline_gets_head_metrics_only(tmp_path):
    root = tmp_path / "dm"
    make_dmimage(root)
    baseline = ProbabilityDetector(lambda imgs: [0.9 if im.width >= 20 else 0.1 for im in imgs], "toy-baseline")
    metrics = run_detection_eval(baseline, _cfg(tmp_path, root))
    assert set(metrics) == {"head", "errors"} and metrics["head"]["overall_acc"] == 1.0


def test_detector_rejecting_an_image_fails_only_that_image(tmp_path):
    root = tmp_path / "dm"
    det = ScriptedDetector(make_dmimage(root), reject_width=21)
    metrics = run_detection_eval(det, _cfg(tmp_path, root))
    assert metrics["errors"]["by_reason"] == {"too_long": 1, "unreadable_image": 1}
    assert metrics["head"]["n"] == 8 and 21 not in det.scored


def test_unigendet_adapter_passes_settings_and_parses_text():
    class _Res:
        def __init__(self, text, p):
            self.text, self.p_fake = text, p

    class _Det:
        model = torch.nn.Linear(1, 1)

        def detect(self, images, questions, max_new_tokens, decoding=None, seed=0):
            self.seen = (list(questions), max_new_tokens, seed)
            return [_Res("this is a FAKE image.", 0.75) for _ in images]

    raw = _Det()
    adapter = UniGenDetImageDetector(raw, max_new_tokens=5, seed=7)
    out = adapter.score([Image.new("RGB", (4, 4))] * 2, ["q1", None])
    assert out == [DetectionResult(0.75, "this is a FAKE image.", FAKE)] * 2
    assert raw.seen[0][0] == "q1" and raw.seen[0][1].startswith("\n") and raw.seen[1:] == (5, 7)
    assert adapter.describe()["dtype"] == "float32" and adapter.model is raw.model
    head_only = UniGenDetImageDetector(raw, max_new_tokens=0).score([Image.new("RGB", (4, 4))])
    assert head_only == [DetectionResult(0.75, None, None)]


# --------------------------------------------------------------------------------------------------
# Harness: resume, fingerprints, shards


def _shard_dir(tmp_path, name="dmimage", setting="none", shard=ShardSpec()):
    return tmp_path / "out" / f"{name}.work" / setting / shard.dirname


def test_killed_job_resumes_without_recomputing(tmp_path):
    root = tmp_path / "dm"
    script = make_dmimage(root)
    with pytest.raises(Killed):
        run_detection_eval(ScriptedDetector(script, die_after_batches=2), _cfg(tmp_path, root))
    shard_dir = _shard_dir(tmp_path)
    assert not (shard_dir / COMPLETE_FILE).exists() and not (tmp_path / "out" / "dmimage.json").exists()
    first = [json.loads(line) for line in (shard_dir / OUTPUTS_FILE).read_text().splitlines()]
    assert len(first) == 4
    with open(shard_dir / OUTPUTS_FILE, "a") as fh:  # a kill in the middle of writing a line
        fh.write('{"index": 4, "key": "biggan_2')

    resumed = ScriptedDetector(script)
    metrics = run_detection_eval(resumed, _cfg(tmp_path, root))
    done_widths = {int(line["key"].rsplit("_", 1)[1].split(".")[0]) for line in first if line["error"] is None}
    assert sorted(resumed.scored) == sorted(set(DM_LAYOUT) - done_widths)  # nothing scored twice
    assert (shard_dir / COMPLETE_FILE).is_file()

    fresh = run_detection_eval(ScriptedDetector(script), _cfg(tmp_path / "fresh", root))
    assert _same(metrics, fresh)
    again = ScriptedDetector(script)
    assert _same(run_detection_eval(again, _cfg(tmp_path, root)), metrics) and again.scored == []


def test_changed_settings_stop_instead_of_mixing(tmp_path):
    root = tmp_path / "dm"
    script = make_dmimage(root)
    with pytest.raises(Killed):
        run_detection_eval(ScriptedDetector(script, die_after_batches=1), _cfg(tmp_path, root))
    with pytest.raises(JobMismatchError, match="identity.detector.version"):
        run_detection_eval(ScriptedDetector(script, version=2), _cfg(tmp_path, root))
    with pytest.raises(JobMismatchError, match="identity.detector.version"):  # a complete shard too
        run_detection_eval(ScriptedDetector(script), _cfg(tmp_path, root))
        run_detection_eval(ScriptedDetector(script, version=2), _cfg(tmp_path, root))
    redo = ScriptedDetector(script, version=2)
    run_detection_eval(redo, _cfg(tmp_path, root, overwrite=True))
    assert sorted(redo.scored) == sorted(DM_LAYOUT)


def test_corrupt_middle_line_is_an_error(tmp_path):
    root = tmp_path / "dm"
    script = make_dmimage(root)
    with pytest.raises(Killed):
        run_detection_eval(ScriptedDetector(script, die_after_batches=2), _cfg(tmp_path, root))
    path = _shard_dir(tmp_path) / OUTPUTS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{garbage\n" + "".join(lines[1:]))
    with pytest.raises(Exception, match="corrupt output line"):
        run_detection_eval(ScriptedDetector(script), _cfg(tmp_path, root))


def test_two_shards_equal_one_shard(tmp_path):
    root = tmp_path / "dm"
    script = make_dmimage(root)
    whole = run_detection_eval(ScriptedDetector(script), _cfg(tmp_path / "one", root))
    a, b = ScriptedDetector(script), ScriptedDetector(script)
    assert run_detection_eval(a, _cfg(tmp_path, root, shard="0/2")) is None  # shard 1 still missing
    assert not (tmp_path / "out" / "dmimage.json").exists()
    with pytest.raises(IncompleteJobError, match="1/2 not complete"):
        run_detection_eval(None, _cfg(tmp_path, root, shard="0/2", gather_only=True))
    sharded = run_detection_eval(b, _cfg(tmp_path, root, shard="1/2"))
    assert _same(sharded, whole)
    assert not set(a.scored) & set(b.scored) and sorted(a.scored + b.scored) == sorted(DM_LAYOUT)
    gathered = run_detection_eval(None, _cfg(tmp_path, root, shard="1/2", gather_only=True))
    assert _same(gathered, whole)
    with pytest.raises(IncompleteJobError):  # the 3-shard job was never run
        run_detection_eval(None, _cfg(tmp_path, root, shard="0/3", gather_only=True))


def test_shard_resolution():
    assert resolve_shard("2/4") == ShardSpec(2, 4)
    assert resolve_shard(None, env={"RANK": "1", "WORLD_SIZE": "3"}) == ShardSpec(1, 3)
    assert resolve_shard(None, env={}) == ShardSpec(0, 1)
    assert resolve_shard("0/2", env={"RANK": "1", "WORLD_SIZE": "3"}) == ShardSpec(0, 2)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert shard_dirname(1, 12) == "shard-00001-of-00012"


def test_merge_uses_report_headlines(tmp_path):
    root = tmp_path / "dm"
    run_detection_eval(ScriptedDetector(make_dmimage(root)), _cfg(tmp_path, root))
    arf = tmp_path / "arf"
    run_detection_eval(ScriptedDetector(make_arforensics(arf)), _cfg(tmp_path, arf, "arforensics"))
    out = tmp_path / "out"
    table = merge_reports([out / "dmimage.json", out / "arforensics.json"])
    header, _, dm_row, arf_row = table.strip().splitlines()
    assert header.startswith("| run | text.real_acc | text.real_f1 | text.fake_acc")
    assert "text.per_generator.VAR.acc" in header and "text.mean_acc" in header
    def cells(row):
        return [c.strip() for c in row.strip().strip("|").split("|")]

    columns, dm, ar = cells(header), cells(dm_row), cells(arf_row)
    assert dm[:3] == ["dmimage", "66.67", "80.00"] and dm[columns.index("text.mean_acc")] == "—"
    assert ar[columns.index("text.real_f1")] == "—" and ar[columns.index("head.mean_acc")] == "50.00"


# --------------------------------------------------------------------------------------------------
# CLI on a tiny real model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
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
    tokenizer = build_tiny_tokenizer([REAL_TEXT, FAKE_TEXT, DEFAULT_QUESTION] * 4, vocab_size=400)
    directory = tmp_path_factory.mktemp("export") / "model"
    save_model_directory(directory, model, model.state_dict(), vae, tokenizer)
    small = {"vit_transform": (56, 28, 14), "vae_transform": (64, 32, 16)}
    data = {k: {"max_size": a, "min_size": b, "stride": c, "max_pixels": 10**6} for k, (a, b, c) in small.items()}
    (directory / "train_config.yaml").write_text(yaml.safe_dump({"data": {**data, "smsa": True}}))
    return directory


def test_cli_dmimage_resume_and_merge_end_to_end(model_dir, tmp_path, capsys):
    from unigendet.cli import main

    root = tmp_path / "dm"
    _png(root / "real_coco" / "a.png", 40, 40)
    _png(root / "biggan" / "b.png", 48, 32)
    out = tmp_path / "reports"
    args = ["eval", "dmimage", "--model", str(model_dir), "--root", str(root), "--out", str(out),
            "--max-new-tokens", "2", "--device", "cpu"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "dmimage.json").read_text())
    assert report["metrics"] == printed and printed["head"]["n"] == 2 and "text" in printed
    assert report["config"]["weights_sha256"] and report["config"]["dtype"] == "float32"
    outputs = out / "dmimage.work" / "none" / "shard-00000-of-00001" / OUTPUTS_FILE
    assert len(outputs.read_text().splitlines()) == 2

    assert main(args) == 0  # complete: nothing rescored, same report
    assert json.loads(capsys.readouterr().out) == printed and len(outputs.read_text().splitlines()) == 2
    # Changed settings: one error line naming the difference, exit 1 (the traceback only with --debug).
    assert main(args[:-4] + ["--max-new-tokens", "3", "--device", "cpu"]) == 1
    assert "max_new_tokens" in capsys.readouterr().err
    with pytest.raises(JobMismatchError, match="max_new_tokens"):
        main(args[:-4] + ["--max-new-tokens", "3", "--device", "cpu", "--debug"])

    assert main(["eval", "merge", str(out / "dmimage.json"), "--out", str(out / "table.md")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | text.real_acc") and (out / "table.md").read_text().strip() == table.strip()


def test_nothing_scorable_is_a_clear_error(tmp_path):
    root = tmp_path / "dm"
    (root / "real_a").mkdir(parents=True)
    (root / "real_a" / "x.png").write_bytes(b"broken")
    (root / "gen_b").mkdir()
    (root / "gen_b" / "y.jpg").write_bytes(b"")
    with pytest.raises(NoScorableImagesError, match=r"nothing to score.*2 of 2 images failed.*unreadable_image"):
        run_detection_eval(ScriptedDetector({}), _cfg(tmp_path, root))
    assert not (tmp_path / "out" / "dmimage.json").exists()
