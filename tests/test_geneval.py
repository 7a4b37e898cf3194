"""GenEval: metadata loading, the rule engine on synthetic detections (hand-worked examples), the layout writer,
result parsing and the summary. No detector or CLIP weights are needed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.evaluation.generation import GenerationSettings
from unigendet.evaluation.geneval import (
    APPROXIMATE_NOTE,
    APPROXIMATE_SCORER,
    COLORS,
    ClipColorClassifier,
    Detection,
    GenEvalReportConfig,
    RuleConfig,
    TransformersMask2FormerDetector,
    boxes_from_masks,
    evaluate_detections,
    generate_geneval_images,
    geneval_class_name,
    load_geneval_metadata,
    object_crop,
    read_results,
    relative_position,
    score_folder,
    select_detections,
    summarize,
    write_geneval_report,
)
from unigendet.evaluation.harness import ShardSpec


def det(x1, y1, x2, y2, score=0.99):
    return Detection((x1, y1, x2, y2), score)


class FixedColours:
    """Colour classifier stub: returns the given colours in order, records what it was asked."""

    def __init__(self, *colours):
        self.colours = list(colours)
        self.asked = []

    def classify(self, image, detections, classname):
        self.asked.append((classname, len(detections)))
        return self.colours[: len(detections)]


# --------------------------------------------------------------------------------------------------
# Metadata


def test_load_metadata_validates_lines(tmp_path):
    good = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
            {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock",
             "count": 3}], "prompt": "a photo of two clocks"},
            {"tag": "position", "include": [{"class": "cat", "count": 1},
                                            {"class": "dog", "count": 1, "position": ["left of", 0]}],
             "prompt": "a photo of a dog left of a cat"}]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(g) for g in good) + "\n\n")
    assert load_geneval_metadata(path) == good
    bad_lines = [
        ({**good[0], "tag": "shapes"}, "unknown tag"),
        ({**good[0], "include": [{"class": "bench", "count": 0}]}, "positive integer 'count'"),
        ({**good[0], "include": [{"class": "bench", "count": 1, "color": "teal"}]}, "unknown color"),
        ({**good[2], "include": [good[2]["include"][0], {"class": "dog", "count": 1, "position": ["near", 0]}]},
         "position must be"),
        ({**good[2], "include": [{"class": "dog", "count": 1, "position": ["above", 1]}]}, "position must be"),
    ]
    for entry, message in bad_lines:
        path.write_text(json.dumps(good[0]) + "\n" + json.dumps(entry) + "\n")
        with pytest.raises(ValueError, match=f"{path.name}:2: .*{message}"):
            load_geneval_metadata(path)
    with pytest.raises(FileNotFoundError):
        load_geneval_metadata(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------
# Detection filtering


def test_select_detections_thresholds_sorting_and_cap():
    raw = {"cat": [det(0, 0, 1, 1, 0.5), det(0, 0, 1, 1, 0.95), det(0, 0, 1, 1, 0.3), det(0, 0, 1, 1, 0.85)],
           "dog": [det(0, 0, 1, 1, 0.2)]}
    kept = select_detections(raw, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.85, 0.5]  # sorted; 0.3 is not > 0.3
    assert "dog" not in kept  # nothing above threshold: the class is absent
    assert [d.score for d in select_detections(raw, "counting")["cat"]] == [0.95]  # 0.9 for counting
    many = {"cup": [det(0, 0, 1, 1, 0.4 + i / 100) for i in range(20)]}
    kept = select_detections(many, "single_object")["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)
    assert len(select_detections(many, "single_object", RuleConfig(max_objects=3))["cup"]) == 3


# --------------------------------------------------------------------------------------------------
# Relative position (hand-worked)


def test_relative_position_hand_worked():
    a = det(0, 0, 10, 10)  # centre (5, 5), size (10, 10)
    b = det(30, 0, 40, 10)  # centre (35, 5)
    # offset A-B = (-30, 0); shrink by 0.1 * (10 + 10) = 2 -> (-28, 0); / |(-30, 0)| -> dx = -0.933
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    below = det(0, 40, 10, 50)  # centre (5, 45): y grows downwards
    assert relative_position(a, below) == {"above"} and relative_position(below, a) == {"below"}
    # offset (-20, -20) -> (-18, -18) / 28.28 = (-0.636, -0.636): both relations
    assert relative_position(a, det(20, 20, 30, 30)) == {"left of", "above"}
    # offset (-12, 10) -> (-10, 8) / 15.62 = (-0.640, 0.512): left of and below
    assert relative_position(det(0, 10, 10, 20), det(12, 0, 22, 10)) == {"left of", "below"}
    # offset (-12, 4) -> (-10, 2) / 12.65 = (-0.79, 0.158): only left of
    assert relative_position(det(0, 4, 10, 14), det(12, 0, 22, 10)) == {"left of"}
    # Overlapping boxes: offset (-1, 0) shrinks to 0 -> no relation at all.
    assert relative_position(a, det(1, 0, 11, 10)) == set()
    # Big boxes: offset (-30, 0), sizes 100 -> shrink by 20 -> dx = -10 / 30 = -0.33: not enough.
    assert relative_position(det(0, 0, 100, 10), det(30, 0, 130, 10)) == set()
    assert relative_position(det(0, 0, 100, 10), det(30, 0, 130, 10), threshold=0.05) == {"left of"}


# --------------------------------------------------------------------------------------------------
# Rules


def meta(tag, include, exclude=None):
    entry = {"tag": tag, "prompt": "p", "include": include}
    if exclude:
        entry["exclude"] = exclude
    return entry


def test_include_and_count():
    m = meta("counting", [{"class": "dog", "count": 2}])
    ok, reason = evaluate_detections(None, {"dog": [det(0, 0, 1, 1)]}, m)
    assert not ok and reason == "expected dog>=2, found 1"
    assert evaluate_detections(None, {"dog": [det(0, 0, 1, 1)] * 3}, m) == (True, "")
    two = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert evaluate_detections(None, {"cat": [det(0, 0, 1, 1)], "dog": [det(0, 0, 1, 1)]}, two) == (True, "")
    ok, reason = evaluate_detections(None, {"cat": [det(0, 0, 1, 1)]}, two)
    assert not ok and reason == "expected dog>=1, found 0"


def test_colour_pass_fail_uses_only_top_count_detections():
    m = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
    cars = {"car": [det(0, 0, 5, 5, 0.9), det(5, 5, 9, 9, 0.8)]}
    colour = FixedColours("red", "blue")
    assert evaluate_detections(None, cars, m, colour) == (True, "")
    assert colour.asked == [("car", 1)]  # only the best car is classified
    ok, reason = evaluate_detections(None, cars, m, FixedColours("blue"))
    assert not ok and reason == "expected red car>=1, found 0 red; and 1 blue"
    m2 = meta("color_attr", [{"class": "car", "count": 2, "color": "red"}])
    ok, reason = evaluate_detections(None, cars, m2, FixedColours("white", "red"))
    assert not ok and reason == "expected red car>=2, found 1 red; and 1 red, 1 white"  # listed in COLORS order
    with pytest.raises(ValueError, match="no colour classifier"):
        evaluate_detections(None, cars, m)
    # No colour check when the count already failed.
    silent = FixedColours("red")
    assert not evaluate_detections(None, {}, m, silent)[0] and silent.asked == []


@pytest.mark.parametrize("relation, target_box, ok", [
    ("left of", (30, 0, 40, 10), True), ("right of", (30, 0, 40, 10), False),
    ("right of", (-40, 0, -30, 10), True), ("above", (0, 30, 10, 40), True),
    ("below", (0, 30, 10, 40), False), ("below", (0, -40, 10, -30), True),
])
def test_each_position_relation(relation, target_box, ok):
    m = meta("position", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": [relation, 0]}])
    objects = {"cat": [det(*target_box)], "dog": [det(0, 0, 10, 10)]}
    correct, reason = evaluate_detections(None, objects, m)
    assert correct is ok
    assert reason == ("" if ok else f"expected dog {relation} target, found "
                      f"{' and '.join(sorted(relative_position(det(0, 0, 10, 10), det(*target_box))))} target")


def test_position_against_every_object_of_the_target_group():
    m = meta("position", [{"class": "cat", "count": 2}, {"class": "dog", "count": 1, "position": ["left of", 0]}])
    dog = det(0, 0, 10, 10)
    both_right = {"cat": [det(30, 0, 40, 10), det(60, 0, 70, 10)], "dog": [dog]}
    assert evaluate_detections(None, both_right, m)[0]
    one_left = {"cat": [det(30, 0, 40, 10), det(-40, 0, -30, 10)], "dog": [dog]}
    assert not evaluate_detections(None, one_left, m)[0]
    # A failed target clause leaves no target.
    ok, reason = evaluate_detections(None, {"cat": [det(30, 0, 40, 10)], "dog": [dog]}, m)
    assert not ok and reason == "expected cat>=2, found 1\nno target for dog to be left of"


def test_exclude_and_counting_threshold():
    m = meta("counting", [{"class": "cat", "count": 2}], exclude=[{"class": "cat", "count": 3}])
    three = {"cat": [det(0, 0, 1, 1, s) for s in (0.99, 0.97, 0.95)]}
    ok, reason = evaluate_detections(None, select_detections(three, "counting"), m)
    assert not ok and reason == "expected cat<3, found 3"
    # The third cat at 0.85 is below the counting threshold (0.9), so only two are counted.
    weak_third = {"cat": [det(0, 0, 1, 1, s) for s in (0.99, 0.97, 0.85)]}
    assert evaluate_detections(None, select_detections(weak_third, "counting"), m) == (True, "")
    # With the normal threshold (0.3) the same detections would fail the exclude clause.
    assert not evaluate_detections(None, select_detections(weak_third, "two_object"), m)[0]


# --------------------------------------------------------------------------------------------------
# Layout, scoring a folder, results and summary


class FakeGenerator:
    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.seeds = []

    def generate(self, prompts, seed, height, width, **kwargs):
        self.seeds += list(seed)
        return [Image.new("RGB", (width, height), (200, 10, 10)) for _ in prompts]


class BoxDetector:
    """Finds one 'car' covering the image with a fixed score."""

    def __init__(self, score):
        self.score = score

    def detect(self, image):
        return {"car": [Detection((0, 0, image.width, image.height), self.score)]}


def test_layout_score_folder_and_results(tmp_path):
    metadata = [meta("single_object", [{"class": "car", "count": 1}]),
                meta("colors", [{"class": "car", "count": 1, "color": "red"}]),
                meta("counting", [{"class": "car", "count": 2}])]
    gen = FakeGenerator()
    settings = GenerationSettings(height=8, width=8, seed=10)
    counts = generate_geneval_images(gen, metadata, tmp_path, settings, samples=2, shard=ShardSpec(0, 2))
    assert counts["generated"] == 2 and sorted(gen.seeds) == [10, 11, 14, 15]  # seed + 2*index + k
    generate_geneval_images(gen, metadata, tmp_path, settings, samples=2, shard=ShardSpec(1, 2))
    assert generate_geneval_images(gen, metadata, tmp_path, settings, samples=2)["generated"] == 0
    assert json.loads((tmp_path / "00001" / "metadata.jsonl").read_text()) == metadata[1]
    assert sorted(p.name for p in (tmp_path / "00002" / "samples").iterdir()) == ["00000.png", "00001.png"]
    rows = score_folder(tmp_path, BoxDetector(0.95), FixedColours("red"), tmp_path / "results.jsonl",
                        scorer=APPROXIMATE_SCORER)
    assert [r["correct"] for r in rows] == [True, True, True, True, False, False]
    assert rows[0]["filename"].endswith("00000/samples/00000.png")
    assert json.loads(rows[0]["details"]) == {"car": [[0.0, 0.0, 8.0, 8.0, 0.95]]}
    assert json.loads(rows[2]["metadata"]) == metadata[1]
    read = read_results(tmp_path / "results.jsonl")
    assert [r["correct"] for r in read] == [r["correct"] for r in rows]
    report = write_geneval_report(read, GenEvalReportConfig(str(tmp_path / "report"), gen_dir=str(tmp_path)))
    assert APPROXIMATE_NOTE in report["geneval"]["notes"]  # the rows carry the approximate scorer's name


def _rows(tag, correct_flags, prompt="p"):
    m = json.dumps({"tag": tag, "prompt": prompt})
    return [{"tag": tag, "correct": c, "metadata": m} for c in correct_flags]


def test_summary_is_mean_of_tag_means_mapped_by_name():
    # position first (the official printout would mislabel it SO) and tags with different image counts.
    rows = (_rows("position", [True, False, False, False]) + _rows("single_object", [True, True])
            + _rows("two_object", [True, False]) + _rows("counting", [False] * 8)
            + _rows("colors", [True] * 4, "a") + _rows("colors", [False] * 4, "b") + _rows("color_attr", [True]))
    summary = summarize(rows)
    assert summary["POS"] == 0.25 and summary["SO"] == 1.0 and summary["TO"] == 0.5 and summary["CT"] == 0.0
    assert summary["CL"] == 0.5 and summary["ATTR"] == 1.0
    assert summary["overall"] == pytest.approx((0.25 + 1 + 0.5 + 0 + 0.5 + 1) / 6)
    assert summary["overall"] != pytest.approx(np.mean([r["correct"] for r in rows]))  # not image-weighted
    assert summary["n_images"] == 25 and summary["n_prompts"] == 7 and summary["correct_prompts_any"] == 5 / 7
    assert summarize(_rows("colors", [True, False]))["missing_tags"] == [
        "single_object", "two_object", "counting", "position", "color_attr"]
    with pytest.raises(ValueError, match="unknown GenEval tags"):
        summarize(_rows("shapes", [True]))


def test_read_official_results_and_cli_summarise(tmp_path, capsys):
    from unigendet.cli import main

    # pandas' to_json(orient="records", lines=True) output of the official script.
    lines = [{"filename": f"/out/00000/samples/0000{k}.png", "tag": "single_object", "prompt": "a photo of a bench",
              "correct": k < 3, "reason": "", "metadata": json.dumps({"tag": "single_object"}), "details": "{}"}
             for k in range(4)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert [r["correct"] for r in read_results(tmp_path / "results.jsonl")] == [True, True, True, False]
    (tmp_path / "model").mkdir()
    assert main(["eval", "geneval", "--stage", "summarise", "--model", str(tmp_path / "model"), "--gen-dir",
                 str(tmp_path), "--results", str(tmp_path / "results.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)["geneval"]
    assert printed["SO"] == 0.75 and printed["overall"] == 0.75 and printed["n_images_SO"] == 4
    assert APPROXIMATE_NOTE not in printed["notes"]
    assert json.loads((tmp_path / "geneval.json").read_text())["metrics"]["geneval"] == printed
    (tmp_path / "bad.jsonl").write_text(json.dumps({"tag": "colors", "correct": "yes", "metadata": "{}"}) + "\n")
    with pytest.raises(ValueError, match="'correct' must be true/false"):
        read_results(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------------------------------
# transformers backend pieces (no weights)


def test_backend_missing_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Mask2Former"):
        TransformersMask2FormerDetector(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="CLIP"):
        ClipColorClassifier.from_pretrained(None)


def test_boxes_from_masks_and_class_names():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    assert boxes_from_masks(masks) == [(2.0, 1.0, 5.0, 3.0), (0.0, 0.0, 0.0, 0.0)]
    assert geneval_class_name("Remote") == "tv remote" and geneval_class_name("potted_plant") == "potted plant"
    assert geneval_class_name("dog") == "dog"


def test_object_crop_composites_on_grey():
    image = Image.new("RGB", (6, 4), (255, 0, 0))
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 1:3] = True
    crop = np.asarray(object_crop(image, Detection((0, 0, 4, 4), 0.9, mask)))
    assert crop.shape == (4, 4, 3)
    assert tuple(crop[1, 1]) == (255, 0, 0) and tuple(crop[0, 0]) == (153, 153, 153)  # #999 outside the mask
    assert tuple(np.asarray(object_crop(image, Detection((0, 0, 2, 2), 0.9)))[0, 0]) == (255, 0, 0)


class FakeClip:
    """Text embedding: one-hot of the colour word in the text (template-independent); image embedding: the
    dominant channel of the crop mapped to red / green / blue."""

    def text_embeddings(self, texts):
        rows = []
        for text in texts:
            row = torch.zeros(len(COLORS))
            row[next(i for i, c in enumerate(COLORS) if f" {c}" in text)] = 1.0
            rows.append(row)
        return torch.stack(rows)

    def image_embeddings(self, images):
        out = torch.zeros(len(images), len(COLORS))
        for n, image in enumerate(images):
            channel = int(np.asarray(image).reshape(-1, 3).mean(0).argmax())
            out[n, COLORS.index(("red", "green", "blue")[channel])] = 1.0
        return out


def test_clip_colour_classifier_logic():
    classifier = ClipColorClassifier(FakeClip())
    assert classifier.classifier("car").shape == (len(COLORS), len(COLORS))
    image = Image.new("RGB", (10, 10), (0, 0, 255))
    image.paste((0, 200, 0), (0, 0, 5, 10))
    colours = classifier.classify(image, [Detection((0, 0, 5, 10), 0.9), Detection((5, 0, 10, 10), 0.9)], "car")
    assert colours == ["green", "blue"]
    assert classifier.classify(image, [], "car") == []
