"""Robustness perturbations (JPEG, random crop) and the robustness job (metrics per setting in one table)."""

import hashlib
import json
import random

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from test_eval_detection import (
    FAKE_TEXT,
    REAL_TEXT,
    ScriptedDetector,
    _png,
    make_dmimage,
)

from unigendet.evaluation.fakeclue import FakeClueEvalConfig, run_fakeclue_eval
from unigendet.evaluation.jobs import (
    DetectionEvalConfig,
    RobustnessConfig,
    run_robustness_eval,
)
from unigendet.evaluation.robustness import (
    PAPER_SETTINGS,
    Perturbation,
    jpeg_compress,
    parse_setting,
    perturbation_seed,
    random_crop_resize,
)
from unigendet.metrics import jsonable


def _noise(width=40, height=24, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _coords(width=40, height=24):
    """Pixel (x, y) stores R = x, G = y: where a crop came from can be read off its pixels."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(width)[None, :]
    arr[..., 1] = np.arange(height)[:, None]
    return Image.fromarray(arr)


# --------------------------------------------------------------------------------------------------
# Settings and perturbations


def test_parse_setting_names_and_errors():
    assert [parse_setting(s).name for s in PAPER_SETTINGS] == list(PAPER_SETTINGS)
    assert parse_setting("JPEG70") == Perturbation("jpeg", 70) and parse_setting("crop0.50").name == "crop0.5"
    for bad in ("blur3", "jpeg0", "jpeg101", "crop1.5", "crop0", "jpeg", ""):
        with pytest.raises(ValueError):
            parse_setting(bad)


def test_jpeg_changes_pixels_deterministically():
    img = _noise()
    q90, q50 = jpeg_compress(img, 90), jpeg_compress(img, 50)
    assert q50.mode == "RGB" and q50.size == img.size
    def err(out):
        return np.abs(np.asarray(out, dtype=float) - np.asarray(img, dtype=float)).mean()

    assert err(q90) > 0 and err(q50) > err(q90)  # lossy, and lossier at lower quality
    assert np.array_equal(np.asarray(jpeg_compress(img, 50)), np.asarray(q50))
    assert np.array_equal(np.asarray(Perturbation("jpeg", 50).apply(img, "any-key", 3)), np.asarray(q50))
    assert Perturbation("none").apply(img, "k") is img


@pytest.mark.parametrize("ratio,crop_w,crop_h", [(0.5, 20, 12), (0.7, 28, 16), (0.9, 36, 21)])
def test_crop_size_position_and_resize_back(ratio, crop_w, crop_h):
    img = _coords(40, 24)  # non-square: D3QE's (h, w) transpose would give 24x40
    for seed in range(5):
        out = random_crop_resize(img, ratio, random.Random(seed))
        assert out.size == (40, 24)
        arr = np.asarray(out)
        xs, ys = np.unique(arr[..., 0]), np.unique(arr[..., 1])
        # Nearest-neighbour upscaling keeps exactly the crop's columns and rows, contiguous and in bounds.
        assert len(xs) == crop_w and len(ys) == crop_h
        assert xs[-1] - xs[0] == crop_w - 1 and ys[-1] - ys[0] == crop_h - 1
        assert xs[-1] < 40 and ys[-1] < 24
    assert np.array_equal(np.asarray(random_crop_resize(img, 1.0, random.Random(0))), np.asarray(img))


def test_crop_is_deterministic_per_key_independent_of_order():
    img = _coords(40, 24)
    crop = Perturbation("crop", 0.5)
    keys = [f"gen/{i}.png" for i in range(12)]
    forward = {k: np.asarray(crop.apply(img, k, 0)) for k in keys}
    backward = {k: np.asarray(crop.apply(img, k, 0)) for k in reversed(keys)}
    assert all(np.array_equal(forward[k], backward[k]) for k in keys)
    corners = {(int(a[0, 0, 0]), int(a[0, 0, 1])) for a in forward.values()}
    assert len(corners) > 3  # different images get different positions
    other_seed = {(int(a[0, 0, 0]), int(a[0, 0, 1])) for a in (np.asarray(crop.apply(img, k, 1)) for k in keys)}
    assert other_seed != corners
    assert perturbation_seed(0, "crop0.5", "a") != perturbation_seed(0, "crop0.7", "a")


# --------------------------------------------------------------------------------------------------
# Robustness job


class CleanOnlyDetector(ScriptedDetector):
    """Right on the unperturbed images, wrong on anything else; records a hash of every image it sees."""

    def __init__(self, originals):
        self.originals = originals  # width -> (array, right text, right p_fake)
        super().__init__({})
        self.seen = []

    def score(self, images, questions=None):
        self.script = {}
        for im in images:
            arr, text, p = self.originals[im.width]
            clean = np.array_equal(np.asarray(im), arr)
            wrong = FAKE_TEXT if text == REAL_TEXT else REAL_TEXT
            self.script[im.width] = (p, text) if clean else (1 - p, wrong)
            self.seen.append(hashlib.sha256(np.asarray(im).tobytes()).hexdigest())
        return super().score(images, questions)


def _fakeclue_set(tmp_path):
    entries, originals = [], {}
    for i, (width, real) in enumerate([(30, True), (31, False), (32, True), (33, False)]):
        _png(tmp_path / f"{width}.png", width, 24, seed=i)
        text = REAL_TEXT if real else FAKE_TEXT
        originals[width] = (np.asarray(Image.open(tmp_path / f"{width}.png").convert("RGB")), text,
                            0.2 if real else 0.8)
        entries.append({"image": f"{width}.png", "label": 1 if real else 0, "cate": "t", "conversations": [
            {"from": "human", "value": "<image>\nReal or fake?"}, {"from": "gpt", "value": text}]})
    (tmp_path / "test.json").write_text(json.dumps(entries))
    return originals


def _base(tmp_path, out="out", **kw):
    return FakeClueEvalConfig(json_path=str(tmp_path / "test.json"), image_root=str(tmp_path),
                              out_dir=str(tmp_path / out), batch_size=3, **kw)


def test_robustness_job_table_curves_and_perturbed_inputs(tmp_path):
    originals = _fakeclue_set(tmp_path)
    det = CleanOnlyDetector(originals)
    cfg = RobustnessConfig(base=_base(tmp_path), settings=["none", "jpeg50", "crop0.5"])
    per_setting = run_robustness_eval(det, cfg)
    assert list(per_setting) == ["none", "jpeg50", "crop0.5"]
    assert per_setting["none"]["text"]["acc"] == 1.0 and per_setting["none"]["head"]["acc"] == 1.0
    for setting in ("jpeg50", "crop0.5"):
        assert per_setting[setting]["text"]["acc"] == 0.0 and per_setting[setting]["head"]["acc"] == 0.0
    # The detector got exactly the perturbed decoded images (JPEG round trip; crop at the key's position).
    expected = set()
    for i, width in enumerate(originals):
        original = Image.fromarray(originals[width][0])
        for setting in ("none", "jpeg50", "crop0.5"):
            arr = np.asarray(parse_setting(setting).apply(original, f"{i}:{width}.png", 0))
            expected.add(hashlib.sha256(arr.tobytes()).hexdigest())
    assert set(det.seen) == expected and len(det.seen) == 12

    out = tmp_path / "out"
    report = json.loads((out / "robustness_fakeclue.json").read_text())
    assert report["headline"] == ["none.text.acc", "jpeg50.text.acc", "crop0.5.text.acc"]
    assert set(report["config"]["jobs"]) == {"none", "jpeg50", "crop0.5"} and "versions" in report["config"]
    md = (out / "robustness_fakeclue.md").read_text()
    assert "| setting | text.acc | text.f1_macro | text.rouge_l | text.css |" in md
    assert "| none | 100.00 |" in md and "| jpeg50 | 0.00 |" in md
    assert (out / "robustness_fakeclue_curves.png").read_bytes()[:4] == b"\x89PNG"
    # The plain FakeClue job reuses the 'none' outputs (same work directory and fingerprint): no rescoring.
    again = CleanOnlyDetector(originals)
    plain = run_fakeclue_eval(again, _base(tmp_path))
    assert again.seen == [] and json.dumps(jsonable(plain)) == json.dumps(jsonable(per_setting["none"]))


def test_sharded_robustness_sees_the_same_perturbations(tmp_path):
    originals = _fakeclue_set(tmp_path)
    whole = CleanOnlyDetector(originals)
    run_robustness_eval(whole, RobustnessConfig(base=_base(tmp_path), settings=["crop0.7"]))
    parts = [CleanOnlyDetector(originals) for _ in range(2)]
    results = [run_robustness_eval(d, RobustnessConfig(base=_base(tmp_path, "sharded", shard=f"{i}/2"),
                                                       settings=["crop0.7"]))
               for i, d in enumerate(parts)]
    assert results[0] is None and results[1] is not None
    assert sorted(parts[0].seen + parts[1].seen) == sorted(whole.seen)


def test_robustness_on_dmimage_and_cli_gather(tmp_path, capsys):
    from unigendet.cli import main

    root = tmp_path / "dm"
    det = ScriptedDetector(make_dmimage(root))
    base = DetectionEvalConfig(benchmark="dmimage", root=str(root), out_dir=str(tmp_path / "out"), batch_size=4)
    per_setting = run_robustness_eval(det, RobustnessConfig(base=base, settings=["none", "jpeg70"]))
    assert per_setting["none"]["text"]["n_unparsed"] == 2 and len(det.scored) == 18
    md = (tmp_path / "out" / "robustness_dmimage.md").read_text()
    assert "| setting | text.overall_acc | text.overall_f1 |" in md
    # The CLI gathers the finished shards without loading a model.
    code = main(["eval", "robustness", "--model", str(tmp_path / "unused"), "--benchmark", "dmimage", "--root",
                 str(root), "--settings", "none", "jpeg70", "--out", str(tmp_path / "out"), "--gather-only"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(jsonable(per_setting)))


def test_robustness_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown robustness setting"):
        RobustnessConfig(base=_base(tmp_path), settings=["none", "blur"])
    with pytest.raises(ValueError, match="duplicate"):
        RobustnessConfig(base=_base(tmp_path), settings=["jpeg50", "JPEG50"])
    assert RobustnessConfig(base=_base(tmp_path)).settings == list(PAPER_SETTINGS)
