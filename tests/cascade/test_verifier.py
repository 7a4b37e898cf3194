"""Stage 3: the UniGenDet verifier's p(fake) is P(fake) under UniGenDet's real = 1 / fake = 0 head (a tiny model
whose head returns fixed logits), the text-only fallback, the spectral-map option, and the stub verifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cascade_stubs import CountingBinary, CountingSpectral, pattern_image, scored_image
from helpers import tiny_config

from unigendet.cascade import Cascade, CascadeConfig, Decision
from unigendet.cascade.config import VerifierConfig
from unigendet.cascade.verifiers import StubSpectralPeakVerifier, UniGenDetVerifier, text_probability
from unigendet.config.loader import ConfigError, from_dict
from unigendet.data.transforms import ImageTransform
from unigendet.detectors.spectral import grayscale, spectral_map
from unigendet.inference.detect import DEFAULT_QUESTION, DetectorPreprocessing, UniGenDetDetector
from unigendet.labels import DetectionResult


@pytest.fixture(scope="module")
def tiny_unigendet():
    return _tiny_detector()


def _tiny_detector():
    from unigendet.data.tokenizer import build_tiny_tokenizer
    from unigendet.models.unigendet import UniGenDet
    from unigendet.models.vae import FluxVAE

    torch.manual_seed(0)
    model = UniGenDet(tiny_config()).eval()
    vae = FluxVAE(tiny_config().vae)
    tokenizer = build_tiny_tokenizer(["This is a real image.", "This is a fake image.", DEFAULT_QUESTION] * 4,
                                     vocab_size=300)
    small = DetectorPreprocessing(ImageTransform(56, 28, 14, 10**6), ImageTransform(64, 32, 16, 10**6))
    return UniGenDetDetector(model, vae, tokenizer, small)


def _fix_head(detector, logits):
    """Make UniGenDet's 2-way head return ``logits`` (index 0 = fake, 1 = real, as in its checkpoints) for any input."""
    last = detector.model.detection_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(logits))


@pytest.mark.parametrize("logits,decision", [((3.0, 0.0), Decision.BLOCK), ((0.0, 3.0), Decision.PASS),
                                             ((0.5, 0.0), Decision.ESCALATE)])
def test_unigendet_head_is_read_as_p_fake(tiny_unigendet, logits, decision):
    _fix_head(tiny_unigendet, logits)
    expected = torch.tensor(logits).softmax(-1)[0].item()  # UniGenDet / FakeClue: class 0 is fake
    verifier = UniGenDetVerifier(tiny_unigendet, max_new_tokens=2)
    [verdict] = verifier.verify([pattern_image(np.random.default_rng(0), True)], [None])
    assert verdict.p_fake == pytest.approx(expected, abs=1e-5)
    assert verdict.raw["source"] == "head" and verdict.raw["head_p_real"] == pytest.approx(1 - expected, abs=1e-5)
    assert isinstance(verdict.explanation, str)
    # through the cascade: the decision follows P(fake), not P(real)
    image = scored_image(0.9, 0.9, size=40)
    cascade = Cascade(CountingBinary(), CountingSpectral(), verifier)
    [result] = cascade.score([image])
    assert result.mllm_confidence == pytest.approx(expected, abs=1e-5) and result.decision is decision
    assert result.mllm_raw["head_p_fake"] == pytest.approx(expected, abs=1e-5)


class TextOnlyClient:
    """A detector without a detection head: only its answer text."""

    def __init__(self, texts):
        self.texts = texts

    def detect(self, images, questions=None, max_new_tokens=0, decoding=None, seed=0):
        return [DetectionResult(math.nan, text) for text in self.texts[: len(images)]]


def test_text_only_verifier_maps_the_verdict_and_escalates_the_unparsable():
    verifier = UniGenDetVerifier(TextOnlyClient(["Yes. This is a fake image.", "This is a real image.", "Unsure."]))
    images = [scored_image(0.9, 0.9, seed=i) for i in range(3)]
    verdicts = verifier.verify(images, [None] * 3)
    assert [v.p_fake for v in verdicts] == [1.0, 0.0, None]
    assert [v.raw["source"] for v in verdicts] == ["text", "text", "none"]
    results = Cascade(CountingBinary(), CountingSpectral(), verifier).score(images)
    assert [r.decision for r in results] == [Decision.BLOCK, Decision.PASS, Decision.ESCALATE]
    assert results[2].flags == ["no_verdict"] and results[2].final_score == 0.9
    assert text_probability(None) is None


def test_the_spectral_map_goes_to_unigendet_as_a_second_image_only_when_asked(monkeypatch):
    from unigendet.data.packing import ViTImage

    tiny_unigendet = _tiny_detector()  # an unpatched head (other tests fix the shared one's logits)
    blocks = []
    original = tiny_unigendet.context

    def counting_context(image, question, extra_images=(), **kwargs):
        items = original(image, question, extra_images, **kwargs)
        blocks.append(sum(isinstance(item, ViTImage) for item in items))
        return items

    monkeypatch.setattr(tiny_unigendet, "context", counting_context)
    images = [scored_image(0.9, 0.9, seed=i) for i in range(2)]
    maps = [spectral_map(grayscale(img)) for img in images]
    plain = UniGenDetVerifier(tiny_unigendet, max_new_tokens=0).verify(images, maps)
    assert blocks == [1, 1]
    blocks.clear()
    fed = UniGenDetVerifier(tiny_unigendet, max_new_tokens=0, feed_spectral_map=True).verify(images, [maps[0], None])
    assert blocks == [2, 1]  # the map is a second ViT block; an image without a map gets none
    assert fed[0].p_fake != pytest.approx(plain[0].p_fake, abs=1e-7)  # the model attends to it
    assert fed[1].p_fake == pytest.approx(plain[1].p_fake, abs=1e-6)
    with pytest.raises(ConfigError, match="feed_spectral_map applies to the unigendet verifier"):
        from_dict(CascadeConfig, {"binary": "a", "spectral": "b", "feed_spectral_map": True,
                                  "verifier": {"kind": "stub_spectral_peak"}})
    with pytest.raises(ConfigError, match="model"):
        from_dict(VerifierConfig, {"kind": "unigendet"})


def test_stub_verifier_is_a_deterministic_function_of_the_spectral_peak():
    rng = np.random.default_rng(0)
    stub = StubSpectralPeakVerifier(center=1.0, width=0.25)
    fakes = [pattern_image(rng, True) for _ in range(6)]
    reals = [pattern_image(rng, False) for _ in range(6)]
    maps = [spectral_map(grayscale(img)) for img in fakes + reals]
    first = stub.verify(fakes + reals, maps)
    assert [v.p_fake for v in first] == [v.p_fake for v in stub.verify(fakes + reals, maps)]
    assert min(v.p_fake for v in first[:6]) > max(v.p_fake for v in first[6:])  # checkerboard peaks stand out
    peak = first[0].raw["peak_strength"]
    assert first[0].p_fake == pytest.approx(1 / (1 + math.exp(-(peak - 1.0) / 0.25)))
    assert "not a model" in first[0].explanation
