"""GenEval: metadata loading, the rule engine on synthetic detections (hand-worked examples), the layout writer,
result parsing and the summary; then the transformers backend (Mask2Former + CLIP colours) end to end on tiny
random-weight models the tests build (tests/tiny_hf.py), through the library and the CLI. Nothing is downloaded."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.evaluation.geneval import (
    APPROXIMATE_NOTE,
    APPROXIMATE_SCORER,
    COLORS,
    GENEVAL_CLASSES,
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
from unigendet.evaluation.image_generation import GenerationSettings


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


def test_hf_coco_instance_labels_map_onto_geneval_classes():
    from helpers.tiny_hf import COCO_INSTANCE_NAMES

    assert len(GENEVAL_CLASSES) == len(set(GENEVAL_CLASSES)) == 80
    assert tuple(geneval_class_name(n) for n in COCO_INSTANCE_NAMES) == GENEVAL_CLASSES  # same order too
    changed = {n: geneval_class_name(n) for n in COCO_INSTANCE_NAMES if geneval_class_name(n) != n}
    assert changed == {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


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


# --------------------------------------------------------------------------------------------------
# transformers backend end to end on tiny random-weight models (built here, nothing downloaded)


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory):
    from helpers.tiny_hf import save_tiny_clip, save_tiny_mask2former

    root = tmp_path_factory.mktemp("backend")
    # Every query: "remote" (GenEval's "tv remote") with a whole-image mask, score ~0.996; 2 queries -> 2 objects.
    detector = save_tiny_mask2former(root / "mask2former", num_queries=2, force_label="remote")
    return detector, save_tiny_clip(root / "clip")


BACKEND_PROMPTS = [
    meta("single_object", [{"class": "tv remote", "count": 1}]),
    meta("counting", [{"class": "tv remote", "count": 2}], exclude=[{"class": "tv remote", "count": 3}]),
    meta("counting", [{"class": "tv remote", "count": 3}], exclude=[{"class": "tv remote", "count": 4}]),
    meta("colors", [{"class": "tv remote", "count": 1, "color": "red"}]),
    meta("position", [{"class": "tv remote", "count": 1},
                      {"class": "tv remote", "count": 1, "position": ["left of", 0]}]),
    meta("two_object", [{"class": "tv remote", "count": 1}, {"class": "dog", "count": 1}]),
    meta("color_attr", [{"class": "cat", "count": 1, "color": "blue"},
                        {"class": "tv remote", "count": 1, "color": "green"}]),
]


def _write_layout(gen_dir, prompts, samples=2):
    rng = np.random.default_rng(7)
    for i, entry in enumerate(prompts):
        folder = gen_dir / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({**entry, "prompt": f"prompt {i}"}))
        for k in range(samples):  # 64 wide, 48 high: a width/height mix-up shows up in masks and boxes
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
                folder / "samples" / f"{k:05d}.png")


def _reference_colour(clip_dir, image, classname):
    """The official colour rule computed straight from the transformers model (not through ClipModel)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        rows = []
        for colour in COLORS:
            texts = [f"a photo of a {colour} {classname}", f"a photo of a {colour}-colored {classname}",
                     f"a photo of a {colour} object"]
            tokens = tokenizer(texts, padding=True, return_tensors="pt")
            text = model.get_text_features(**tokens)
            text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1).mean(0)
            rows.append(text / text.norm())
        pixels = CLIPImageProcessorPil.from_pretrained(clip_dir)(images=[image], return_tensors="pt")["pixel_values"]
        embedding = model.get_image_features(pixel_values=pixels)
        embedding = torch.nn.functional.normalize(getattr(embedding, "pooler_output", embedding), dim=-1)
    return COLORS[int((embedding @ torch.stack(rows).T).argmax())]


def test_mask2former_detector_on_a_tiny_model(tiny_backend, tmp_path, caplog):
    from helpers.tiny_hf import COCO_INSTANCE_NAMES, save_tiny_mask2former

    with caplog.at_level(logging.WARNING, logger="unigendet.evaluation.geneval"):
        detector = TransformersMask2FormerDetector(tiny_backend[0])
    assert "do not cover" not in caplog.text  # the COCO label names cover every GenEval class
    assert detector.labels[65] == "tv remote" and detector.labels[64] == "computer mouse"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    found = detector.detect(image)
    assert list(found) == ["tv remote"] and len(found["tv remote"]) == 2
    for d in found["tv remote"]:
        assert d.box == (0.0, 0.0, 64.0, 48.0) and 0.99 < d.score < 1 and d.mask.shape == (48, 64) and d.mask.all()
    # Random weights: arbitrary detections, but well-formed and repeatable; all labels are GenEval names.
    random_dir = save_tiny_mask2former(tmp_path / "random", num_queries=6)
    random = TransformersMask2FormerDetector(random_dir, min_score=0.0)
    first, second = random.detect(image), random.detect(image)
    assert first and set(first) <= {geneval_class_name(n) for n in COCO_INSTANCE_NAMES}
    assert sum(len(v) for v in first.values()) <= 6
    for name, dets in first.items():
        assert [(d.box, d.score) for d in dets] == [(d.box, d.score) for d in second[name]]
        for d in dets:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48 and d.mask.shape == (48, 64)
            assert boxes_from_masks(torch.from_numpy(d.mask)[None]) == [d.box]
    assert TransformersMask2FormerDetector(random_dir).detect(image) == {}  # random scores ~1/81 < 0.3
    config = json.loads((random_dir / "config.json").read_text())
    config["id2label"] = {str(i): f"thing {i}" for i in range(80)}
    (random_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="unigendet.evaluation.geneval"):
        TransformersMask2FormerDetector(random_dir)
    assert "do not cover 80 GenEval classes" in caplog.text


def test_clip_colour_classifier_on_a_tiny_model(tiny_backend):
    classifier = ClipColorClassifier.from_pretrained(tiny_backend[1])
    table = classifier.classifier("tv remote")
    assert table.shape == (len(COLORS), 8) and torch.allclose(table.norm(dim=1), torch.ones(len(COLORS)))
    assert torch.cdist(table, table).fill_diagonal_(1).min() > 1e-4  # the colour word changes the text embedding
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = np.zeros((48, 64), dtype=bool)
    mask[5:30, 10:40] = True
    detection = Detection((10, 5, 40, 30), 0.9, mask)
    expected = _reference_colour(tiny_backend[1], object_crop(image, detection), "tv remote")
    assert classifier.classify(image, [detection, Detection((0, 0, 64, 48), 0.9)], "tv remote")[0] == expected


@pytest.mark.slow
def test_transformers_backend_end_to_end(tiny_backend, tmp_path, capsys):
    from unigendet.cli import main

    gen = tmp_path / "gen"
    _write_layout(gen, BACKEND_PROMPTS)
    detector_dir, clip_dir = tiny_backend
    runs = []
    for n in range(2):  # fresh models each time: the scores must not depend on state
        out = tmp_path / f"run{n}"
        rows = score_folder(gen, TransformersMask2FormerDetector(detector_dir),
                            ClipColorClassifier.from_pretrained(clip_dir), out / "results.jsonl",
                            scorer=APPROXIMATE_SCORER)
        runs.append((rows, (out / "results.jsonl").read_text()))
    rows, text = runs[0]
    assert runs[1][1] == text
    assert len(rows) == len(text.splitlines()) == 2 * len(BACKEND_PROMPTS)
    assert [json.loads(line) for line in text.splitlines()] == rows
    by_tag = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(row)
        assert row["scorer"] == APPROXIMATE_SCORER and set(json.loads(row["details"])) == {"tv remote"}
        assert json.loads(row["details"])["tv remote"] == [[0.0, 0.0, 64.0, 48.0, pytest.approx(0.996, abs=1e-3)]] * 2
    assert [r["correct"] for r in by_tag["single_object"]] == [True, True]
    counting = by_tag["counting"]
    assert [r["correct"] for r in counting] == [True, True, False, False]
    assert counting[2]["reason"] == "expected tv remote>=3, found 2"
    for row in by_tag["position"]:  # identical whole-image boxes: no relation at all
        assert not row["correct"] and row["reason"] == "expected tv remote left of target, found  target"
    assert all(r["reason"] == "expected dog>=1, found 0" for r in by_tag["two_object"])
    assert all(r["reason"].startswith("expected cat>=1, found 0") for r in by_tag["color_attr"])
    for row in by_tag["colors"]:  # whole-image mask and box: the crop is the image itself
        with Image.open(row["filename"]) as image:
            colour = _reference_colour(clip_dir, image.convert("RGB"), "tv remote")
        assert row["correct"] is (colour == "red")
        assert row["reason"] == ("" if colour == "red" else f"expected red tv remote>=1, found 0 red; and 1 {colour}")

    report_dir = tmp_path / "report"
    metrics = write_geneval_report(rows, GenEvalReportConfig(str(report_dir), backend="transformers",
                                                             gen_dir=str(gen), rules=RuleConfig()))
    assert metrics["geneval"]["notes"] == [APPROXIMATE_NOTE] and metrics["geneval"]["n_images"] == 14
    assert metrics["geneval"]["SO"] == 1.0 and metrics["geneval"]["CT"] == 0.5 and metrics["geneval"]["POS"] == 0.0

    (tmp_path / "model").mkdir()
    cli_out = tmp_path / "cli"
    assert main(["eval", "geneval", "--stage", "score", "--model", str(tmp_path / "model"), "--gen-dir", str(gen),
                 "--detector-dir", str(detector_dir), "--clip-dir", str(clip_dir), "--out", str(cli_out),
                 "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)["geneval"]
    assert (cli_out / "geneval_results.jsonl").read_text() == text
    assert printed == metrics["geneval"] and APPROXIMATE_NOTE in printed["notes"]
    saved = json.loads((cli_out / "geneval.json").read_text())
    assert saved["metrics"]["geneval"] == printed
    assert "APPROXIMATE" in (cli_out / "geneval.md").read_text()
    # The summary of those results, read back, is labelled approximate too.
    assert main(["eval", "geneval", "--stage", "summarise", "--model", str(tmp_path / "model"), "--gen-dir", str(gen),
                 "--results", str(cli_out / "geneval_results.jsonl"), "--out", str(tmp_path / "again")]) == 0
    assert json.loads(capsys.readouterr().out)["geneval"] == printed
