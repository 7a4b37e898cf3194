"""Routing at every threshold boundary for both verifier mappings, the early-exit invariant (call counters), the
result type and its JSON record, and the lossy-input flag."""

from __future__ import annotations

import io
import json
import math

import pytest
from cascade_stubs import CountingBinary, CountingSpectral, CountingVerifier, scored_image
from PIL import Image

from unigendet.cascade import Cascade, CascadeResult, Decision, Thresholds
from unigendet.cascade.pipeline import is_lossy
from unigendet.cascade.routing import verifier_decision
from unigendet.config.loader import ConfigError
from unigendet.labels import DetectionResult


def _cascade(mapping="flowchart", thresholds=None):
    stages = CountingBinary(), CountingSpectral(), CountingVerifier()
    return Cascade(*stages, thresholds=thresholds, mllm_mapping=mapping), stages


# (b, s, m) -> decision, stage exited, spectral ran, verifier ran, flags; per mapping where they differ
ROUTES = [
    # stage 1
    (0.2999, 0.99, 0.99, {"*": ("pass", "binary", [])}),
    (0.0, 0.99, 0.99, {"*": ("pass", "binary", [])}),
    # stage 2 (b = 0.30 reaches it)
    (0.30, 0.5499, 0.99, {"*": ("pass", "spectral", ["low_risk"])}),
    (0.99, 0.0, 0.99, {"*": ("pass", "spectral", ["low_risk"])}),
    # stage 3 (s = 0.55 reaches it)
    (0.30, 0.55, 0.80, {"*": ("block", "mllm", [])}),
    (0.30, 0.55, 1.0, {"*": ("block", "mllm", [])}),
    (0.30, 0.55, 0.7999, {"code_literal": ("pass", "mllm", ["cleared"]), "flowchart": ("escalate", "mllm", [])}),
    (0.30, 0.55, 0.50, {"code_literal": ("pass", "mllm", ["cleared"]), "flowchart": ("escalate", "mllm", [])}),
    (0.30, 0.55, 0.4999, {"code_literal": ("escalate", "mllm", []), "flowchart": ("pass", "mllm", ["cleared"])}),
    (0.30, 0.55, 0.0, {"code_literal": ("escalate", "mllm", []), "flowchart": ("pass", "mllm", ["cleared"])}),
    (0.30, 0.55, None, {"*": ("escalate", "mllm", ["no_verdict"])}),
    (0.30, 0.55, float("nan"), {"*": ("escalate", "mllm", ["no_verdict"])}),
]
CASES = [(mapping, b, s, m, expected.get(mapping, expected.get("*")))
         for b, s, m, expected in ROUTES for mapping in ("flowchart", "code_literal")]


@pytest.mark.parametrize("mapping,b,s,m,expected", CASES)
def test_routing_at_every_boundary(mapping, b, s, m, expected):
    cascade, (binary, spectral, verifier) = _cascade(mapping)
    [result] = cascade.score([scored_image(b, s, m)])
    decision, stage, flags = expected
    assert (result.decision.value, result.stage_exited, result.flags) == (decision, stage, flags)
    # Each stage ran exactly when the image reached it.
    assert binary.calls == 1
    assert spectral.calls == (stage != "binary")
    assert verifier.calls == (stage == "mllm")
    assert result.binary_score == b
    assert result.spectral_score == (None if stage == "binary" else s)
    assert result.mllm_confidence == (m if stage == "mllm" and m is not None and not math.isnan(m) else None)
    assert set(result.latency_ms) == set(result.stages_run)
    # final score: the deepest stage's score (spectral when the verifier gave none)
    deepest = {"binary": b, "spectral": s, "mllm": s if m is None or math.isnan(m) else m}[stage]
    assert result.final_score == result.p_fake == deepest


def test_verifier_decision_is_a_pure_rule():
    th = Thresholds()
    assert verifier_decision(0.80, th, "flowchart") == (Decision.BLOCK, [])
    assert verifier_decision(0.7999, th, "flowchart")[0] is Decision.ESCALATE
    assert verifier_decision(0.7999, th, "code_literal") == (Decision.PASS, ["cleared"])
    with pytest.raises(ValueError):
        verifier_decision(0.5, th, "other")


def test_t1_binary_synthetic_has_no_effect():
    images = [scored_image(b, 0.9, 0.9) for b in (0.2, 0.5, 0.76, 0.99)]
    plain, _ = _cascade()
    moved, _ = _cascade(thresholds=Thresholds(t1_binary_synthetic=0.31))
    strip = [r.record() | {"latency_ms": None} for r in plain.score(images)]
    assert strip == [r.record() | {"latency_ms": None} for r in moved.score(images)]


def test_a_non_finite_stage_score_is_an_error_not_a_route():
    cascade, _ = _cascade()
    with pytest.raises(ValueError, match="stage 1 must return one finite score"):
        cascade.score([scored_image(float("nan"))])
    with pytest.raises(ValueError, match="spectral stage returned a non-finite score"):
        cascade.score([scored_image(0.5, float("nan"))])


def test_early_exit_call_counters_on_a_mixed_batch():
    cascade, (binary, spectral, verifier) = _cascade()
    scores = [(0.1, 0.9, 0.9), (0.5, 0.1, 0.9), (0.6, 0.7, 0.95), (0.29, 0.9, 0.9), (0.9, 0.9, 0.1), (0.4, 0.54, 0.9)]
    results = cascade.score([scored_image(*s, seed=i) for i, s in enumerate(scores)])
    # stage 1 once on the whole batch; the spectral stage only on b >= 0.3; the verifier once, on s >= 0.55 only
    assert (binary.calls, binary.images) == (1, 6)
    assert spectral.calls == 4
    assert (verifier.calls, verifier.images) == (1, 2)
    assert [r.stage_exited for r in results] == ["binary", "spectral", "mllm", "binary", "mllm", "spectral"]
    assert [r.decision.value for r in results] == ["pass", "pass", "block", "pass", "pass", "pass"]
    assert results[2].explanation == "m=0.95" and results[0].explanation is None
    # a batch nobody passes on never calls the later stages
    cascade, (binary, spectral, verifier) = _cascade()
    cascade.score([scored_image(0.1), scored_image(0.2, seed=1)])
    assert (binary.calls, spectral.calls, verifier.calls) == (1, 0, 0)


def test_result_is_a_detection_result_with_the_published_fields():
    result = CascadeResult(p_fake=0.9, text="x", image_id="a", decision=Decision.BLOCK, binary_score=0.5,
                           spectral_score=0.7, mllm_confidence=0.9, stage_exited="mllm")
    assert isinstance(result, DetectionResult) and result.label_name == "fake"
    names = [f for f in CascadeResult.__dataclass_fields__][len(DetectionResult.__dataclass_fields__):]
    assert names[:6] == ["image_id", "decision", "binary_score", "spectral_score", "mllm_confidence", "stage_exited"]
    short = CascadeResult(image_id="b", decision="pass", binary_score=0.1)
    assert short.stage_exited == "binary" and short.spectral_score is None and short.decision is Decision.PASS
    assert Decision.PASS == "pass" and Decision("escalate") is Decision.ESCALATE
    with pytest.raises(ValueError):
        CascadeResult(image_id="c", decision="pass", binary_score=0.1, stage_exited="other")
    with pytest.raises(TypeError):
        CascadeResult("d", Decision.PASS, 0.1)  # the cascade's own fields are keyword-only


def test_record_and_details_are_json_and_leave_the_map_out():
    cascade, _ = _cascade()
    [result] = cascade.score([scored_image(0.5, 0.6, 0.9)], image_ids=["img-1"])
    assert result.spectral_map is not None and result.spectral_map.dtype.is_floating_point
    record = json.loads(json.dumps(result.record(), allow_nan=False))
    assert record["decision"] == "block" and record["image_id"] == "img-1" and record["final_score"] == 0.9
    assert record["stage_exited"] == "mllm" and record["explanation"] == "m=0.9" and record["label"] == "fake"
    assert "spectral_map" not in record and record["spectral_map_ref"] is None
    assert set(record["latency_ms"]) == {"binary", "spectral", "mllm"}
    details = json.loads(json.dumps(result.details(), allow_nan=False))
    assert details["decision"] == "block" and details["spectral_score"] == 0.6
    assert DetectionResult(0.3).details() is None  # other detectors store nothing extra


def test_spectral_maps_written_when_asked(tmp_path):
    from safetensors.torch import load_file

    cascade = Cascade(CountingBinary(), CountingSpectral(), CountingVerifier(), spectral_map_dir=tmp_path / "maps")
    [passed, checked] = cascade.score([scored_image(0.1), scored_image(0.5, 0.2, seed=1)])
    assert passed.spectral_map_ref is None and passed.spectral_map is None
    assert load_file(checked.spectral_map_ref)["spectral_map"].shape == (8, 8)


def test_lossy_input_flag_for_jpeg(tmp_path):
    image = scored_image(0.1, size=16)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    jpeg = Image.open(io.BytesIO(buffer.getvalue()))
    assert is_lossy(jpeg) and is_lossy(jpeg.convert("RGB"))  # conversions keep the decoder's markers
    assert not is_lossy(image)  # built from an array: its history is unknown
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert not is_lossy(Image.open(io.BytesIO(png.getvalue())))
    from unigendet.data.images import SOURCE_FORMAT, load_image_file

    exif_only = image.copy()  # e.g. a camera JPEG without a JFIF header, as the project's loader returns it
    exif_only.info[SOURCE_FORMAT] = "JPEG"
    assert is_lossy(exif_only)

    image.save(tmp_path / "x.jpg")
    image.save(tmp_path / "x.png")
    # the harness's loader converts to RGB (dropping ``format``); the JPEG decoder's markers survive
    assert is_lossy(load_image_file(tmp_path / "x.jpg")) and not is_lossy(load_image_file(tmp_path / "x.png"))
    jpeg.load()
    jpeg.info.update(b=0.1)
    cascade, _ = _cascade()
    [result] = cascade.score([jpeg])
    assert result.flags == ["lossy_input"] and result.decision is Decision.PASS


@pytest.mark.parametrize("bad", [{"t2_spectral": 1.5}, {"t1_binary_min": math.nan}, {"t3_mllm_uncertain": 0.9},
                                 {"t3_mllm_synthetic": -0.1}])
def test_threshold_validation_names_the_key(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        Thresholds(**bad).validate()
