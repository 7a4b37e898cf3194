"""The FakeClue evaluation job: entries -> detector -> metrics -> reports, with bad entries counted."""

import json
from dataclasses import dataclass

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
