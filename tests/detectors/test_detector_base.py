"""The common detector contract: registry, configs and recipes, save/load, the evaluation adapter, the cache."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from detector_data import disk_set, smooth_field_set, tiny_corit, tiny_ltd
from safetensors.torch import load_file, save_file

from unigendet.config.loader import ConfigError, to_dict
from unigendet.detectors.adapter import DetectorAdapter
from unigendet.detectors.base import (
    CheckpointKeyError,
    Detector,
    available_detectors,
    build_detector,
    detector_class,
    detector_config,
    load_detector,
    register_detector,
)
from unigendet.detectors.feature_cache import FeatureCache, cached_features
from unigendet.labels import LABEL_FAKE, LABEL_REAL, DetectionResult
from unigendet.recipes import recipe_path

TINY = {"ltd": tiny_ltd(), "corit": tiny_corit(), "spectral": {"radial_bins": 16}}


def fitted(name: str) -> Detector:
    detector = build_detector(name, TINY[name])
    if name == "spectral":
        images, labels = smooth_field_set(0, 16)
        detector.fit(images, labels)
    return detector


def test_registry_knows_the_builtin_detectors_and_rejects_unknown_names():
    assert {"ltd", "corit", "spectral"} <= set(available_detectors())
    assert detector_class("ltd").name == "ltd"
    with pytest.raises(ConfigError, match="unknown detector 'dire'.*corit"):
        build_detector("dire", {})


def test_a_new_detector_registers_by_name():
    @register_detector("test-constant")
    class Constant(detector_class("spectral")):
        pass

    assert detector_class("test-constant") is Constant and Constant.name == "test-constant"
    with pytest.raises(ValueError, match="already registered"):
        register_detector("test-constant")(type("Other", (Detector,), {}))


def test_configs_come_from_dicts_or_yaml_with_dotted_overrides(tmp_path):
    config = detector_config("ltd", tiny_ltd(), ["window_n=2", "backbone.dtype=float32"])
    assert config.window_n == 2 and config.backbone.hidden_size == 64
    path = tmp_path / "ltd.yaml"
    path.write_text("_base_: " + str(recipe_path("detectors/ltd_tiny.yaml")) + "\nbranches: raw\n")
    assert detector_config("ltd", path, ["pos_enc=false"]).branches == "raw"
    with pytest.raises(ConfigError, match="unknown key.*windw_n"):
        detector_config("ltd", tiny_ltd(), ["windw_n=2"])
    with pytest.raises(ConfigError, match="backbone.hidden_size"):
        detector_config("corit", {"backbone": {"hidden_size": "wide"}})


@pytest.mark.parametrize("name", ["ltd", "corit", "spectral"])
def test_shipped_recipes_load_and_the_tiny_ones_build(name):
    real = detector_config(name, recipe_path(f"detectors/{name}.yaml"))
    tiny = detector_config(name, recipe_path(f"detectors/{name}_tiny.yaml"))
    if name != "spectral":
        assert real.backbone.hidden_size == 1024 and real.backbone.path is not None
        assert tiny.backbone.path is None
    detector = build_detector(name, tiny)
    assert len(detector.predict_proba(smooth_field_set(0, 2)[0])) == 2


@pytest.mark.parametrize("name", ["ltd", "corit", "spectral"])
def test_save_then_load_gives_identical_probabilities(name, tmp_path):
    detector = fitted(name)
    with torch.no_grad():
        for _, p in detector.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))  # anything but the initial weights
    images = disk_set(2, 4)[0]
    expected = detector.predict_proba(images)
    detector.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "detector.json").read_text())
    assert meta["detector"] == name and meta["config"] == json.loads(json.dumps(meta["config"]))
    loaded = load_detector(tmp_path)
    assert type(loaded) is type(detector)
    assert loaded.predict_proba(images) == expected
    assert to_dict(loaded.config) == meta["config"]


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    fitted("ltd").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    state.pop("head.bias")
    state["head.scale"] = torch.ones(1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointKeyError, match=r"missing keys \['head.bias'\].*unexpected keys \['head.scale'\]"):
        load_detector(tmp_path)
    state["head.bias"] = torch.zeros(3)
    state.pop("head.scale")
    save_file(state, str(weights))
    with pytest.raises(CheckpointKeyError, match=r"head.bias: file \(3,\) vs model \(1,\)"):
        load_detector(tmp_path)
    with pytest.raises(ConfigError, match="holds a 'ltd' detector"):
        detector_class("corit").from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a saved detector"):
        load_detector(tmp_path / "missing")


def test_backbone_can_be_saved_separately_and_is_checked_by_fingerprint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip_dir = tmp_path / "clip"
    vision = {k: v for k, v in tiny_ltd()["backbone"].items() if k != "attn_implementation"}
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(clip_dir)
    detector = build_detector("ltd", tiny_ltd(backbone={"path": str(clip_dir), "attn_implementation": "eager"}))
    detector.save_pretrained(tmp_path / "head_only", include_backbone=False)
    saved = load_file(str(tmp_path / "head_only" / "model.safetensors"))
    assert saved and not any(k.startswith("backbone.") for k in saved)
    images = smooth_field_set(0, 3)[0]
    assert load_detector(tmp_path / "head_only").predict_proba(images) == detector.predict_proba(images)
    with pytest.raises(ValueError, match="include_backbone=False needs"):
        fitted("ltd").save_pretrained(tmp_path / "random", include_backbone=False)
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="not the one this detector was trained with"):
        load_detector(tmp_path / "head_only", backbone_path=str(tmp_path / "other"))


def test_evaluation_adapter_returns_detection_results():
    detector = fitted("spectral")
    adapter = DetectorAdapter(detector, batch_size=3, threshold=0.5)
    images = smooth_field_set(5, 5)[0]
    results = adapter.score(images, questions=[None] * 5)
    assert all(isinstance(r, DetectionResult) for r in results) and len(results) == 5
    expected = detector.predict_proba(images)
    for result, p in zip(results, expected):
        assert result.p_fake == pytest.approx(p) and result.text is None
        assert result.label == (LABEL_FAKE if p >= 0.5 else LABEL_REAL)
    described = adapter.describe()
    assert described["detector"] == "spectral" and described["weights"] == detector.weights_fingerprint()
    assert adapter.model is detector


def test_feature_cache_reuses_features_and_logs(tmp_path, caplog):
    detector = build_detector("corit", tiny_corit())
    images, masks, labels = disk_set(4, 6)
    with caplog.at_level(logging.INFO, logger="unigendet.detectors.feature_cache"):
        cache = FeatureCache.for_detector(detector, tmp_path)
        first = cached_features(detector, images[:4], cache, masks=masks[:4])
        assert (cache.hits, cache.misses) == (0, 4)
        second = cached_features(detector, images, cache, masks=masks)
        assert (cache.hits, cache.misses) == (4, 6)
    assert torch.equal(first, second[:4])
    assert torch.equal(second, detector.extract_features(detector.preprocess(images, masks=masks)).float())
    assert "frozen-feature cache in use" in caplog.text and "only the head runs" in caplog.text
    assert "4 hits, 6 misses" in cache.summary()
    batch = {"features": second, "labels": torch.tensor(labels, dtype=torch.float32)}
    assert math.isfinite(float(detector.loss(batch)["loss"].detach()))
    # The key covers the extras: the same image with another mask is another entry.
    cached_features(detector, images[:1], cache, masks=[~masks[0]])
    assert cache.misses == 7


def test_feature_cache_is_keyed_by_backbone_and_feature_settings(tmp_path):
    base = build_detector("corit", tiny_corit())
    assert base.feature_fingerprint() == build_detector("corit", tiny_corit(head="mlp")).feature_fingerprint()
    assert base.feature_fingerprint() != build_detector("corit", tiny_corit(tau=0.5)).feature_fingerprint()
    other_weights = tiny_corit(backbone={**tiny_corit()["backbone"], "init_seed": 1})
    assert base.feature_fingerprint() != build_detector("corit", other_weights).feature_fingerprint()
    assert base.feature_fingerprint(train=True) != base.feature_fingerprint(train=False)


def test_random_training_augmentation_is_never_cached(tmp_path):
    detector = build_detector("ltd", tiny_ltd(image={"resize": 32, "train_resize": 36, "train_random_crop": True}))
    cache = FeatureCache.for_detector(detector, tmp_path, train=True)
    with pytest.raises(ValueError, match="cannot be cached"):
        cached_features(detector, smooth_field_set(0, 2)[0], cache, train=True)
    assert cached_features(detector, smooth_field_set(0, 2)[0], FeatureCache.for_detector(detector, tmp_path)).shape \
        == (2, 6, 64)
