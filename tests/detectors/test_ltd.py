"""LTD: window selection, branches, gradients, ablations, the mechanism, a tiny-CLIP run, official checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from detector_data import auc, hf_to_openai_visual, smooth_field_set, tiny_ltd

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import CheckpointKeyError, build_detector
from unigendet.detectors.ltd import candidate_windows, layer_differences

logger = logging.getLogger(__name__)


def features(batch: int = 4, layers: int = 6, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, layers, dim, generator=torch.Generator().manual_seed(seed))


def test_forced_one_hot_selects_the_exact_slice():
    f = features()
    for window in range(4):
        detector = build_detector("ltd", tiny_ltd(selection=f"fixed:{window}"))
        selected, weights = detector.select_window(f)
        assert torch.equal(selected, f[:, window:window + 3])
        assert torch.equal(weights, torch.nn.functional.one_hot(torch.full((4,), window), 4).float())
    windows = candidate_windows(f, 3)
    assert windows.shape == (4, 4, 3, 64) and torch.equal(windows[:, 2], f[:, 2:5])


def test_gumbel_selection_is_one_hot_per_sample_in_training():
    detector = build_detector("ltd", tiny_ltd())
    detector.train()
    f = features(batch=16)
    selected, weights = detector.select_window(f)
    chosen = weights.argmax(-1)
    torch.testing.assert_close(weights.detach(), torch.nn.functional.one_hot(chosen, 4).float())
    for b in range(16):
        torch.testing.assert_close(selected[b], f[b, chosen[b]:chosen[b] + 3])


def test_difference_branch_uses_adjacent_layer_differences():
    window = features(batch=2, layers=5)
    diffs = layer_differences(window)
    assert diffs.shape == (2, 4, 64)
    for k in range(4):
        assert torch.equal(diffs[:, k], window[:, k + 1] - window[:, k])


def test_straight_through_gradients_reach_the_selector_and_never_the_backbone():
    detector = build_detector("ltd", tiny_ltd())
    detector.train()
    images, labels = smooth_field_set(0, 4)
    out = detector.loss(detector.collate(images, labels, train=True))
    out["loss"].backward()
    assert detector.selector_logits.grad is not None and detector.selector_logits.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in detector.backbone.parameters())
    trainable = {n for n, _ in detector.trainable_parameters()}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    assert {"selector_logits", "cls_raw", "cls_ltd", "pos_raw.weight", "pos_ltd.weight", "head.weight"} <= trainable


def test_evaluation_is_deterministic_argmax_or_seeded_sampling():
    images, _ = smooth_field_set(1, 6)
    detector = build_detector("ltd", tiny_ltd())
    first = detector.predict_proba(images)
    assert detector.predict_proba(images) == first and len(first) == 6
    assert detector.describe()["selected_window"] == int(detector.selector_logits.argmax())
    sampling = build_detector("ltd", tiny_ltd(eval_selection="sample", eval_seed=3))
    assert sampling.predict_proba(images) == sampling.predict_proba(images)


def test_output_shape_and_bce_goes_down_on_a_fixed_batch():
    detector = build_detector("ltd", tiny_ltd(encoder_dropout=0.0))
    images, labels = smooth_field_set(2, 8)
    batch = detector.collate(images, labels)
    assert detector(batch).shape == (8,)
    optimizer = detector.make_optimizer(lr=1e-3)
    losses = [detector.training_step(batch, optimizer)["loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("overrides, absent", [
    ({"branches": "raw"}, {"cls_ltd", "pos_ltd.weight"}),
    ({"branches": "ltd"}, {"cls_raw", "pos_raw.weight"}),
    ({"pos_enc": False}, {"pos_raw.weight", "pos_ltd.weight"}),
    ({"selection": "fixed:1"}, {"selector_logits"}),
])
def test_ablations_build_and_score(overrides, absent):
    detector = build_detector("ltd", tiny_ltd(**overrides))
    names = set(detector.state_dict())
    assert not names & absent
    assert detector(detector.preprocess(smooth_field_set(0, 2)[0])).shape == (2,)
    width = 64 * (2 if detector.config.branches == "both" else 1)
    assert detector.head.in_features == width


def test_window_and_layer_ablations_change_the_candidate_set():
    detector = build_detector("ltd", tiny_ltd(candidate_layers=[2, 4, 6, 8, 10], window_n=2))
    assert detector.selector_logits.shape == (4,)
    f = detector.extract_features(detector.preprocess(smooth_field_set(0, 2)[0]))
    states = detector.backbone.hidden_states(torch.zeros(1, 3, 32, 32))
    assert f.shape == (2, 5, 64) and len(states) == 13


@pytest.mark.parametrize("overrides, message", [
    ({"window_n": 7}, "window_n"),
    ({"branches": "ltd", "window_n": 1}, "window_n"),
    ({"candidate_layers": [5, 4, 6]}, "strictly increasing"),
    ({"candidate_layers": [10, 11, 12]}, "outside the backbone"),
    ({"selection": "fixed:9"}, "only 4 windows"),
    ({"selection": "softmax"}, "gumbel"),
    ({"encoder_heads": 5}, "encoder_heads"),
])
def test_invalid_configs_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_detector("ltd", tiny_ltd(**overrides))


def trajectories(n: int, gen: torch.Generator, offset: float = 0.0, jump_at: int = 4):
    """Mock backbone output: per-layer CLS random walks (small steps); fakes jump once, between candidate
    positions ``jump_at`` and ``jump_at + 1``, along a fixed direction. ``offset`` adds a per-sample shift."""
    labels = torch.arange(n) % 2
    start = torch.randn(n, 1, 64, generator=gen) * (1.0 + offset)
    steps = 0.1 * torch.randn(n, 6, 64, generator=gen)
    steps[:, 0] = 0
    walk = start + steps.cumsum(1)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(123))
    direction = 4.0 * direction / direction.norm()
    walk[:, jump_at + 1:] += labels.view(-1, 1, 1) * direction
    return walk, labels.float()


def _train_on_trajectories(branches: str, offset: float, steps: int = 300) -> tuple:
    detector = build_detector("ltd", tiny_ltd(branches=branches))
    optimizer = detector.make_optimizer(lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    curve = []
    for _ in range(steps):
        f, y = trajectories(64, gen, offset)
        curve.append(detector.training_step({"features": f, "labels": y}, optimizer)["loss"])
    detector.eval()
    f, y = trajectories(512, gen, offset)
    with torch.no_grad():
        accuracy = float(((detector({"features": f}) >= 0).float() == y).float().mean())
    return detector, accuracy, curve


def test_mechanism_difference_branch_finds_the_window_with_the_jump():
    # The jump sits between candidate positions 4 and 5; with n = 3 only window 3 (positions 3..5) contains it.
    detector, accuracy, _ = _train_on_trajectories("ltd", offset=0.0)
    assert accuracy >= 0.95
    assert detector.selected_window() == 3


def test_report_raw_versus_difference_branch_under_large_offsets():
    """Reported, not asserted: differences cancel a per-sample offset shared by all layers."""
    means = {}
    for branches in ("raw", "ltd"):
        _, accuracy, curve = _train_on_trajectories(branches, offset=10.0, steps=150)
        means[branches] = (sum(curve[-30:]) / 30, accuracy)
    logger.info("large offsets, last-30 mean loss / accuracy: raw %.3f / %.3f, ltd %.3f / %.3f",
                *means["raw"], *means["ltd"])


def test_tiny_clip_integration_reaches_auc_0_8():
    detector = build_detector("ltd", tiny_ltd())
    train_images, train_labels = smooth_field_set(0, 128)
    test_images, test_labels = smooth_field_set(1, 128)
    with torch.no_grad():
        train_features = detector.extract_features(detector.preprocess(train_images))
    labels = torch.tensor(train_labels, dtype=torch.float32)
    optimizer = detector.make_optimizer(lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, 128, (32,), generator=gen)
        detector.training_step({"features": train_features[idx], "labels": labels[idx]}, optimizer)
    assert auc(detector.predict_proba(test_images), test_labels) >= 0.8


def test_geometry_read_from_a_clip_directory_is_validated_again(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = {k: v for k, v in tiny_ltd()["backbone"].items() if k != "attn_implementation"}
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"outside the backbone's blocks 0\.\.11 \(with the backbone geometry of"):
        build_detector("ltd", {"backbone": {"path": str(tmp_path)}})  # the default blocks 11..19 need ViT-L


# ---------------------------------------------------------------------------------------------- official layout
OFFICIAL_HEAD = {  # the names of the authors' models/clip_models.py
    "selector.logits": "selector_logits", "origin_cls": "cls_raw", "delta_cls": "cls_ltd",
    "origin_pos_embedding.weight": "pos_raw.weight", "delta_pos_embedding.weight": "pos_ltd.weight",
    "classification_head.0.weight": "head_norm.weight", "classification_head.0.bias": "head_norm.bias",
    "classification_head.1.weight": "head.weight", "classification_head.1.bias": "head.bias",
}


def official_state(detector) -> dict[str, torch.Tensor]:
    """``detector`` written as the authors' CLIPModel.state_dict() (text tower included, as theirs is)."""
    own = detector.state_dict()
    state = {name: own[ours].clone() for name, ours in OFFICIAL_HEAD.items()}
    for key, value in own.items():
        if key.startswith("encoder."):
            state["encoder.layers.0." + key[len("encoder."):]] = value.clone()
    state.update({"model." + k: v for k, v in hf_to_openai_visual(detector.backbone).items()})
    state.update({"model.positional_embedding": torch.zeros(16, 32), "model.text_projection": torch.zeros(32, 16),
                  "model.logit_scale": torch.zeros(()), "model.token_embedding.weight": torch.zeros(100, 32),
                  "model.ln_final.weight": torch.ones(32), "model.ln_final.bias": torch.zeros(32),
                  "model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32)})
    return state


def save_official(path, state) -> None:
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "total_steps": 10}, path)


def test_official_checkpoint_layout_loads_to_identical_scores(tmp_path):
    source = build_detector("ltd", tiny_ltd(init_seed=5, backbone={**tiny_ltd()["backbone"], "init_seed": 7}))
    path = tmp_path / "model_epoch_4.pth"
    save_official(path, official_state(source))
    loaded = build_detector("ltd", tiny_ltd(official_checkpoint=str(path)))
    images, _ = smooth_field_set(3, 6)
    assert loaded.predict_proba(images) == source.predict_proba(images)
    assert loaded.backbone.fingerprint() == source.backbone.fingerprint()


def test_official_checkpoint_key_errors_name_the_keys(tmp_path):
    state = official_state(build_detector("ltd", tiny_ltd()))
    cases = [
        ({k: v for k, v in state.items() if k != "delta_cls"}, r"missing keys \['delta_cls'\]"),
        ({**state, "adapter.weight": torch.zeros(2)}, r"unexpected keys \['adapter.weight'\]"),
        ({k: v for k, v in state.items() if k != "model.visual.ln_pre.bias"}, r"visual\.ln_pre\.bias"),
    ]
    for i, (broken, message) in enumerate(cases):
        path = tmp_path / f"broken{i}.pth"
        save_official(path, broken)
        with pytest.raises(CheckpointKeyError, match=message):
            build_detector("ltd", tiny_ltd(official_checkpoint=str(path)))
    path = tmp_path / "wider.pth"
    save_official(path, {**state, "model.visual.conv1.weight": torch.zeros(96, 3, 4, 4)})
    with pytest.raises(ConfigError, match=r"vision tower has hidden_size 96 \(config 64\)"):
        build_detector("ltd", tiny_ltd(official_checkpoint=str(path)))
    path = tmp_path / "raw_branch.pth"
    save_official(path, state)
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys \['delta_cls', 'delta_pos_embedding.weight'\]"):
        build_detector("ltd", tiny_ltd(branches="raw", official_checkpoint=str(path)))
