"""The FakeClue evaluation job: entries -> detector -> metrics -> reports, with bad entries counted;
resumable and sharded through the evaluation harness."""

import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from unigendet.evaluation.fakeclue import FakeClueEvalConfig, run_fakeclue_eval


@dataclass
class _Result:
    text: str
    p_fake: float


class _ScriptedDetector:
    """Answers from a script keyed by image width, so the test knows every prediction."""

    def __init__(self, script):
        self.script = script
        self.model = torch.nn.Linear(1, 1)
        self.questions = []

    def detect(self, images, questions, max_new_tokens, decoding=None, seed=0):
        self.questions += questions
        return [_Result(*self.script[img.width]) for img in images]


def _entry(image, label, answer):
    return {"image": image, "label": label, "cate": "t",
            "conversations": [{"from": "human", "value": "<image>\nReal or fake?"}, {"from": "gpt", "value": answer}]}


def test_job_scores_text_and_head_and_counts_bad_entries(tmp_path):
    for width in (8, 9, 10):
        Image.new("RGB", (width, 8), (width * 10, 0, 0)).save(tmp_path / f"{width}.png")
    entries = [
        _entry("8.png", 0, "This is a fake image. Blurry hands."),   # FakeClue 0 = fake
        _entry("9.png", 1, "This is a real image. Natural light."),
        _entry("10.png", 1, "This is a real image. Sharp."),
        _entry("missing.png", 1, "This is a real image."),
        {"label": 1},  # malformed
    ]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    detector = _ScriptedDetector({
        8: ("This is a fake image. Blurry hands.", 0.9),
        9: ("This is a fake image. Odd light.", 0.7),   # wrong
        10: ("I cannot tell.", 0.2),                    # unparsable
    })
    cfg = FakeClueEvalConfig(json_path=str(tmp_path / "test.json"), image_root=str(tmp_path),
                             out_dir=str(tmp_path / "out"), batch_size=2)
    metrics = run_fakeclue_eval(detector, cfg)
    assert detector.questions == ["\nReal or fake?"] * 3
    text, head = metrics["text"], metrics["head"]
    assert text["n_parsed"] == 2 and text["n_unparsed"] == 1 and text["acc"] == 0.5
    assert head["acc"] == 2 / 3  # p_fake 0.9 (fake) right, 0.7 on a real wrong, 0.2 on a real right
    report = json.loads((tmp_path / "out" / "fakeclue.json").read_text())
    assert report["config"]["skipped_entries"] == 2
    assert (tmp_path / "out" / "fakeclue.md").is_file() and (tmp_path / "out" / "fakeclue_roc.png").is_file()


class _CountingDetector(_ScriptedDetector):
    """Counts images scored; raises after ``die_after`` detect calls to simulate a killed job."""

    def __init__(self, script, die_after=None):
        super().__init__(script)
        self.widths = []
        self.die_after = die_after

    def detect(self, images, questions, max_new_tokens, decoding=None, seed=0):
        if self.die_after is not None and len(self.questions) // 2 >= self.die_after:
            raise KeyboardInterrupt
        self.widths += [img.width for img in images]
        return super().detect(images, questions, max_new_tokens, decoding, seed)


def _split(tmp_path, n=6):
    entries, script = [], {}
    for i in range(n):
        width = 8 + i
        Image.new("RGB", (width, 8), (width * 10, 0, 0)).save(tmp_path / f"{width}.png")
        fake = i % 2 == 0
        entries.append(_entry(f"{width}.png", 0 if fake else 1, f"This is a {'fake' if fake else 'real'} image."))
        script[width] = (f"This is a {'fake' if i % 3 else 'real'} image. Because.", 0.1 + 0.15 * i)
    (tmp_path / "test.json").write_text(json.dumps(entries))
    return script


def _cfg(tmp_path, out="out", **kw):
    return FakeClueEvalConfig(json_path=str(tmp_path / "test.json"), image_root=str(tmp_path),
                              out_dir=str(tmp_path / out), batch_size=2, **kw)


def test_job_resumes_after_a_kill_and_shards_match(tmp_path):
    script = _split(tmp_path)
    whole = run_fakeclue_eval(_CountingDetector(script), _cfg(tmp_path, "whole"))
    with pytest.raises(KeyboardInterrupt):
        run_fakeclue_eval(_CountingDetector(script, die_after=2), _cfg(tmp_path))
    resumed = _CountingDetector(script)
    metrics = run_fakeclue_eval(resumed, _cfg(tmp_path))
    assert resumed.widths == [12, 13]  # the first two batches were kept
    assert json.dumps(metrics) == json.dumps(whole)
    shards = [_CountingDetector(script) for _ in range(2)]
    results = [run_fakeclue_eval(d, _cfg(tmp_path, "sharded", shard=f"{i}/2")) for i, d in enumerate(shards)]
    assert results[0] is None and json.dumps(results[1]) == json.dumps(whole)
    assert shards[0].widths == [8, 10, 12] and shards[1].widths == [9, 11, 13]


def test_no_scorable_entry_is_an_error_without_a_report(tmp_path):
    """Every entry missing or malformed: a clear error, exit 1 at the command line, and no report of zeros."""
    from unigendet.evaluation.harness import NoScorableImagesError

    entries = [_entry("missing.png", 1, "This is a real image."), {"label": 0}]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    cfg = FakeClueEvalConfig(json_path=str(tmp_path / "test.json"), image_root=str(tmp_path),
                             out_dir=str(tmp_path / "out"), batch_size=2)
    with pytest.raises(NoScorableImagesError, match=r"nothing to score: 1 of 1 images failed.*1 invalid entries"):
        run_fakeclue_eval(_ScriptedDetector({}), cfg)
    assert not (tmp_path / "out" / "fakeclue.json").exists()


def test_benchmark_entries_stay_inside_the_image_root(tmp_path):
    """An entry whose image is a symlink out of the image root, or climbs out with '..', is an invalid entry."""
    from unigendet.evaluation.benchmarks import load_fakeclue

    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "in.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    entries = [_entry("in.png", 1, "This is a real image."), _entry("link.png", 0, "This is a fake image."),
               _entry("../secret.png", 0, "This is a fake image.")]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    bench = load_fakeclue(tmp_path / "test.json", root)
    assert [r.key for r in bench.records] == ["0:in.png"]
    assert len(bench.invalid) == 2 and all(e.startswith("path_outside_root") for e in bench.invalid)
