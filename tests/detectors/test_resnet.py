"""The ResNet binary classifier: frozen trunk / trainable stages split, HF directory loading, save/load, training."""

from __future__ import annotations

import pytest
import torch
from detector_data import smooth_field_set

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import build_detector, detector_config, load_detector
from unigendet.recipes import recipe_path

TINY_GEOMETRY = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")


def tiny(**overrides) -> dict:
    cfg = {"backbone": dict(TINY_GEOMETRY), "crop": 32,
           "image": {"resize": 32, "train_resize": 32, "train_random_crop": False, "train_hflip": False}}
    cfg.update(overrides)
    return cfg


def write_hf_resnet(directory, seed: int = 0):
    """A tiny ``ResNetForImageClassification`` saved as the microsoft/resnet-50 directory is laid out."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    model = ResNetForImageClassification(ResNetConfig(**TINY_GEOMETRY, num_labels=10))
    model.save_pretrained(directory)
    return model


def test_only_the_last_stages_and_the_classifier_train():
    detector = build_detector("resnet", tiny(trainable_stages=1))
    names = {name.split(".")[0] for name, _ in detector.trainable_parameters()}
    assert names == {"head_stages", "classifier"}
    assert not any(p.requires_grad for p in detector.backbone.parameters())
    assert len(detector.backbone.stages) == 3 and len(detector.head_stages) == 1
    features = detector.extract_features(detector.preprocess(smooth_field_set(0, 2)[0]))
    assert features.shape == (2, 32, 2, 2)  # output of stage 3 at 32 px
    probe = build_detector("resnet", tiny(trainable_stages=0))
    assert len(probe.head_stages) == 0 and probe.extract_features(
        probe.preprocess(smooth_field_set(0, 1)[0])).shape == (1, 64, 1, 1)


def test_shipped_recipes_load_and_the_tiny_one_builds():
    real = detector_config("resnet", recipe_path("detectors/resnet.yaml"))
    assert real.backbone.hidden_sizes == [256, 512, 1024, 2048] and real.crop == 224
    detector = build_detector("resnet", detector_config("resnet", recipe_path("detectors/resnet_tiny.yaml")))
    scores = detector.predict_proba(smooth_field_set(0, 3)[0])
    assert len(scores) == 3 and all(0.0 < p < 1.0 for p in scores)


def test_a_hugging_face_directory_loads_strictly_and_sets_the_geometry(tmp_path):
    reference = write_hf_resnet(tmp_path / "resnet")
    config = detector_config("resnet", {"backbone": {"path": str(tmp_path / "resnet")}, "crop": 32})
    detector = build_detector("resnet", config)
    assert config.backbone.hidden_sizes == TINY_GEOMETRY["hidden_sizes"] and config.backbone.layer_type == "basic"
    ours = detector.backbone.embedder.embedder.convolution.weight
    theirs = reference.resnet.embedder.embedder.convolution.weight
    assert torch.equal(ours, theirs)
    assert torch.equal(detector.head_stages[0].layers[0].shortcut.convolution.weight,
                       reference.resnet.encoder.stages[3].layers[0].shortcut.convolution.weight)
    with pytest.raises(ConfigError, match="not a Hugging Face ResNet directory"):
        build_detector("resnet", {"backbone": {"path": str(tmp_path)}})


def test_a_directory_with_missing_weights_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_resnet(tmp_path / "resnet")
    weights = tmp_path / "resnet" / "model.safetensors"
    state = load_file(str(weights))
    state = {k: v for k, v in state.items() if "stages.3" not in k}
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="weights missing"):
        build_detector("resnet", {"backbone": {"path": str(tmp_path / "resnet")}, "crop": 32})


@pytest.mark.parametrize("include_backbone", [True, False])
def test_save_then_load_gives_identical_probabilities(tmp_path, include_backbone):
    write_hf_resnet(tmp_path / "resnet")
    detector = build_detector("resnet", tiny(backbone={"path": str(tmp_path / "resnet")}))
    with torch.no_grad():
        for _, p in detector.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    images = smooth_field_set(1, 4)[0]
    expected = detector.predict_proba(images)
    detector.save_pretrained(tmp_path / "saved", include_backbone=include_backbone)
    loaded = load_detector(tmp_path / "saved")
    assert loaded.predict_proba(images) == expected


def test_fine_tuning_lowers_the_loss_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    detector = build_detector("resnet", tiny())
    images, labels = smooth_field_set(2, 16)
    batch = detector.collate(images, labels, train=True)
    running = detector.head_stages[0].layers[0].layer[0].normalization.running_mean.clone()
    optimizer = detector.make_optimizer(lr=3e-3)
    first = detector.training_step(batch, optimizer)["loss"]
    for _ in range(40):
        last = detector.training_step(batch, optimizer)["loss"]
    assert last < 0.5 * first
    assert torch.equal(detector.head_stages[0].layers[0].layer[0].normalization.running_mean, running)
    detector.config.freeze_batchnorm = False
    detector.training_step(batch, optimizer)
    assert not torch.equal(detector.head_stages[0].layers[0].layer[0].normalization.running_mean, running)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="trainable_stages must be in"):
        detector_config("resnet", tiny(trainable_stages=4))
    with pytest.raises(ConfigError, match="one per stage"):
        detector_config("resnet", {"backbone": {"depths": [1, 1]}})
