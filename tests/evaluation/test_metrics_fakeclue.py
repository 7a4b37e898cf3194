"""FakeClue metrics (official protocol) and evaluation reports, on fixed texts."""

import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("rouge_score")

from rouge_score import rouge_scorer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score
from sklearn.metrics.pairwise import cosine_similarity

from unigendet.labels import fakeclue_to_internal, internal_to_fakeclue, parse_verdict
from unigendet.metrics import (
    answer_scores,
    css_tfidf,
    extract_answer,
    head_metrics,
    merge_reports,
    text_metrics,
    write_report,
)

REAL, FAKE = 0, 1

# (answer or None for a crashed sample, reference, internal label)
CASES = [
    ("This is a fake image. The edges of the fur are blurry.", "This is a fake image. The fur edges are blurry and the shadows disagree.", FAKE),
    ("THIS IS A REAL IMAGE. Sharp, consistent lighting.", "This is a real image. Lighting is consistent and details are sharp.", REAL),
    ("This is a real image... no, this is a fake image.", "This is a fake image. The text on the sign is garbled.", FAKE),  # both
    ("I cannot tell.", "This is a real image. Natural textures.", REAL),  # unparsed
    ("", "This is a fake image. Warped hands.", FAKE),  # empty answer: unparsed, scores 0
    (None, "This is a real image. Nothing odd.", REAL),  # crashed
    ("this is a fake image", "This is a real image. Plausible reflections.", REAL),  # wrong, no period
    ("This Is A Fake Image. Odd windows.", "This is a fake image. The windows are irregular.", FAKE),
]


def _official_scores(reference, answer):
    """Direct rouge-score / sklearn computation, as the official script does it."""
    response = answer.lower()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = scorer.score(reference, response)["rougeL"].fmeasure
    tfidf = TfidfVectorizer().fit_transform([reference, response])
    return rouge, cosine_similarity(tfidf[0:1], tfidf[1:2])[0][0]


# -- parsing --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("This is a real image. Clear outlines.", REAL),
    ("This is a fake image. Blurry outlines.", FAKE),
    ("THIS IS A FAKE IMAGE.", FAKE),
    ("this Is A rEAL iMAGE", REAL),
    ("Analysis: ... so this is a fake image overall.", FAKE),  # anywhere, not only at the start
    ("This is a fake image. Just kidding, this is a real image.", REAL),  # both: real is checked first
    ("This is a real image, not: this is a fake image.", REAL),
    ("This is a real imagery", REAL),  # plain substring test
    ("This is a  real image.", None),  # two spaces
    ("This is not a real image.", None),
    ("The image is fake.", None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_label_conversions_are_explicit():
    assert fakeclue_to_internal(1) == REAL and fakeclue_to_internal(0) == FAKE
    assert internal_to_fakeclue(REAL) == 1 and internal_to_fakeclue(FAKE) == 0
    with pytest.raises(ValueError):
        fakeclue_to_internal(-1)


def test_extract_answer():
    assert extract_answer("<|im_start|>This is a fake image.<|im_end|>junk") == "This is a fake image."
    assert extract_answer("pre<|im_start|>answer<|im_end|><|im_start|>next<|im_end|>") == "answer"
    assert extract_answer("already clean") == "already clean"


# -- per-answer ROUGE-L / CSS ---------------------------------------------------------------------------------------

def test_rouge_l_hand_worked():
    # tokens a b c d e vs a c e f: LCS = 3, P = 3/4, R = 3/5, F = 2*3/(4+5) = 2/3
    assert answer_scores("a b c d e", "a c e f")[0] == pytest.approx(2 / 3)
    # stemming: dogs -> dog, running/runs -> run, so LCS covers everything
    assert answer_scores("The dogs running", "the dog runs")[0] == pytest.approx(1.0)


def test_css_hand_worked():
    # vocab {cat, dog, red}; n = 2 docs, smooth idf: idf(red) = ln(3/3)+1 = 1, idf(cat) = idf(dog) = ln(3/2)+1.
    # ref = (w, 0, 1), ans = (0, w, 1) with w = 1 + ln 1.5  =>  cos = 1 / (1 + w^2)
    w = 1 + math.log(1.5)
    expected = 1 / (1 + w * w)
    assert css_tfidf("red cat", "red dog") == pytest.approx(expected, rel=1e-12)
    # one-character tokens are dropped and case is ignored
    assert answer_scores("A red cat", "a RED dog")[1] == pytest.approx(expected, rel=1e-12)
    assert css_tfidf("Same words here", "same words here") == pytest.approx(1.0)


def test_empty_vocabulary_keeps_rouge():
    rouge, css = answer_scores("a b", "a")  # no token of >= 2 chars: TF-IDF fails
    assert rouge == pytest.approx(2 / 3) and css == 0.0
    assert answer_scores("This is a fake image.", "") == (0.0, 0.0)
    assert answer_scores("", "This is a fake image.") == (0.0, 0.0)


# -- aggregate text metrics -----------------------------------------------------------------------------------------

def test_text_metrics_hand_computed():
    preds, refs, labels = map(list, zip(*CASES))
    m = text_metrics(preds, refs, labels, return_samples=True)
    # parsed: #0 fake/fake, #1 real/real, #2 both->real vs fake, #6 fake vs real, #7 fake/fake
    assert (m["n"], m["n_errors"], m["n_scored"]) == (8, 1, 7)
    assert (m["n_parsed"], m["n_unparsed"], m["n_correct"], m["n_both_phrases"]) == (5, 2, 3, 1)
    assert m["acc"] == pytest.approx(3 / 5)  # denominator = parsed answers only
    # fake: tp 2, fp 1, fn 1 -> 2/3 ; real: tp 1, fp 1, fn 1 -> 1/2 ; macro = 7/12
    assert m["f1_macro"] == pytest.approx(7 / 12)
    assert m["confusion"] == [[1, 1], [1, 2]]
    assert m["unparsed_by_class"] == {"real": 1, "fake": 1}
    assert m["real_acc"] == pytest.approx(1 / 2) and m["fake_acc"] == pytest.approx(2 / 3)
    assert m["acc_unparsed_as_wrong"] == pytest.approx(3 / 7)
    assert [s and s["pred"] for s in m["samples"]] == [FAKE, REAL, REAL, None, None, None, FAKE, FAKE]

    # ROUGE-L / CSS: mean over the 7 non-crashed answers, parsed or not; the empty answer counts as 0
    rouge, css = [], []
    for a, r, _ in CASES:
        if a is None:
            continue
        if a:
            x, y = _official_scores(r, a)
        else:
            x, y = 0.0, 0.0
        rouge.append(x)
        css.append(y)
    assert m["rouge_l"] == pytest.approx(sum(rouge) / 7, rel=1e-12)
    assert m["css"] == pytest.approx(sum(css) / 7, rel=1e-12)

    # same acc / F1 as sklearn on FakeClue's own encoding (real = 1, fake = 0)
    parsed = [(internal_to_fakeclue(y), internal_to_fakeclue(parse_verdict(a)))
              for a, _, y in CASES if a is not None and parse_verdict(a) is not None]
    gts, prs = zip(*parsed)
    assert m["f1_macro"] == pytest.approx(f1_score(gts, prs, average="macro"))
    assert m["acc"] == pytest.approx(accuracy_score(gts, prs))


def test_text_metrics_single_class_and_nothing_parsed():
    m = text_metrics(["This is a fake image.", "this is a fake image x"], ["This is a fake image."] * 2, [FAKE, FAKE])
    assert m["acc"] == 1.0 and m["f1_macro"] == 1.0  # macro over the labels present: only "fake"
    m = text_metrics(["This is a real image."], ["This is a fake image."], [FAKE])
    assert m["acc"] == 0.0 and m["f1_macro"] == 0.0
    m = text_metrics(["no idea", None], ["This is a fake image.", "This is a real image."], [FAKE, REAL])
    assert math.isnan(m["acc"]) and m["f1_macro"] == 0.0 and m["n_parsed"] == 0 and m["n_unparsed"] == 1
    assert any("no answer parsed" in n for n in m["notes"])
    with pytest.raises(ValueError):
        text_metrics(["x"], ["y"], [2])  # labels must be internal 0/1
    with pytest.raises(ValueError):
        text_metrics(["x"], ["y", "z"], [0])


# -- head metrics ---------------------------------------------------------------------------------------------------

def test_head_metrics_vs_sklearn():
    p = [0.9, 0.2, 0.6, 0.4, 0.5, 0.05]
    y = [FAKE, REAL, REAL, FAKE, FAKE, REAL]
    m = head_metrics(p, y)
    pred = [1, 0, 1, 0, 1, 0]  # 0.5 -> fake (argmax tie of the official (fake, real) head)
    assert m["acc"] == pytest.approx(accuracy_score(y, pred)) == pytest.approx(4 / 6)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    # hand: positives {0.9, 0.4, 0.5} vs negatives {0.2, 0.6, 0.05}: 7 of 9 pairs ordered correctly
    assert m["auc"] == pytest.approx(roc_auc_score(y, p)) == pytest.approx(7 / 9)
    assert m["confusion"] == confusion_matrix(y, pred, labels=[REAL, FAKE]).tolist() == [[2, 1], [1, 2]]
    assert (m["n"], m["n_real"], m["n_fake"]) == (6, 3, 3)
    assert head_metrics(p, y, threshold=0.55)["confusion"] == [[2, 1], [2, 1]]


def test_head_metrics_single_class_auc_is_nan():
    m = head_metrics([0.8, 0.3], [FAKE, FAKE])
    assert math.isnan(m["auc"]) and any("single class" in n and "fake" in n for n in m["notes"])
    assert m["acc"] == 0.5 and m["confusion"] == [[0, 0], [1, 1]]
    assert m["f1_macro"] == pytest.approx(f1_score([1, 1], [1, 0], average="macro"))
    with pytest.raises(ValueError):
        head_metrics([float("nan")], [FAKE])


# -- reports --------------------------------------------------------------------------------------------------------

def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def test_write_and_merge_reports(tmp_path):
    pytest.importorskip("matplotlib")
    preds, refs, labels = map(list, zip(*CASES))
    text = text_metrics(preds, refs, labels)
    p = [0.9, 0.2, 0.6, 0.4, 0.5, 0.05]
    y = [FAKE, REAL, REAL, FAKE, FAKE, REAL]
    metrics = {"text": text, "head": head_metrics(p, y)}
    config = {"checkpoint": "runs/x/0001200", "decoding": {"greedy": True, "max_new_tokens": 1000}, "seed": 42}
    paths = write_report(tmp_path, "run_a", metrics, config, p_fake=p, labels=y)
    assert set(paths) == {"json", "md", "roc"} and all(q.exists() for q in paths.values())

    doc = json.loads(paths["json"].read_text())
    assert doc["name"] == "run_a" and doc["config"] == config
    assert doc["metrics"] == _nan_to_none(metrics)
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "Confusion matrix" in md and "| real | 1 | 1 | 1 |" in md and "60.00" in md and "run_a_roc.png" in md

    single = {"head": head_metrics([0.8, 0.3], [FAKE, FAKE])}
    paths_b = write_report(tmp_path / "b", "run_b", single, {}, p_fake=[0.8, 0.3], labels=[FAKE, FAKE])
    assert paths_b["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths_b["json"].read_text())["metrics"]["head"]["auc"] is None
    assert "N/A" in paths_b["md"].read_text()

    paths_c = write_report(tmp_path, "run_c", text, {"note": "text only"})
    assert "roc" not in paths_c

    table = merge_reports([paths["json"], paths_b["json"], paths_c["json"]])
    rows = table.strip().splitlines()
    assert len(rows) == 2 + 3
    assert rows[0].startswith("| run | text.acc | text.f1_macro | text.rouge_l | text.css")
    assert "head.auc" in rows[0]
    assert rows[2].startswith("| run_a | 60.00 | 58.33 |")
    assert rows[3].startswith("| run_b |") and "N/A" in rows[3] and "—" in rows[3]
    assert rows[4].startswith("| run_c |")
    assert merge_reports([paths_c["json"]], columns=["acc", "n"]) == "| run | acc | n |\n|---|---|---|\n| run_c | 60.00 | 8 |\n"
