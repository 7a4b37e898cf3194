"""CoRIT: regions, CGP masks, pooling, region-token injection, HRI, ablations, SAM, and a behavioural run."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from detector_data import auc, disk_set, tiny_corit

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import build_detector
from unigendet.detectors.corit import linear_head_gsnr, refinement_masks, region_anchors, region_pool
from unigendet.detectors.corit_regions import (
    convex_hull,
    landmark_hull_mask,
    partition_from_hull,
    self_blend,
    token_membership,
)
from unigendet.detectors.images import normalize
from unigendet.detectors.sam import SAM

ABLATED = dict(use_rsi=False, use_rrm=False, use_hri=False)
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def disks():
    return disk_set(0, 4)


def test_partition_from_a_disk_mask_is_disjoint_and_exact():
    yy, xx = np.mgrid[0:32, 0:32]
    disk = torch.from_numpy(((yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 10 ** 2).astype(np.float32))[None, None]
    parts = partition_from_hull(disk, radius=4)
    assert torch.equal(parts.sum(1), torch.ones(1, 32, 32))  # a partition of the pixels
    member = token_membership(parts, 4)
    assert member.shape == (1, 3, 64)
    assert member.sum(1).max() <= 1  # no token in two regions
    grid = member[0].view(3, 8, 8)
    assert grid[0, 3:5, 3:5].all() and not grid[0, 0, 0]  # F: the disk's centre tokens
    assert grid[2, 0, 0] and grid[2, 7, 7] and not grid[2, 3:5, 3:5].any()  # Bg: corners, not the centre


def test_landmark_hull_covers_the_landmarks():
    points = np.array([[10, 10], [22, 10], [22, 24], [10, 24], [16, 16], [12, 20]], dtype=np.float32)
    hull = convex_hull(points)
    assert len(hull) == 4
    mask = np.asarray(landmark_hull_mask(points, 32, 32)) > 0
    assert mask[16, 16] and mask[11, 11] and not mask[2, 2] and not mask[30, 30]


def test_self_blend_is_deterministic_and_local():
    images, masks, _ = disk_set(3, 2)
    detector = build_detector("corit", tiny_corit())
    batch = detector.preprocess(images, masks=masks)
    a = self_blend(batch["pixels"], batch["hull"], batch["seeds"].tolist(), detector.config.sbi)
    b = self_blend(batch["pixels"], batch["hull"], batch["seeds"].tolist(), detector.config.sbi)
    assert torch.equal(a, b)
    changed = (a - batch["pixels"]).abs().sum(1) > 1e-6
    assert changed.any() and not changed[:, 0, 0].any()  # far corner untouched
    empty = self_blend(batch["pixels"], torch.zeros_like(batch["hull"]), [1, 2], detector.config.sbi)
    assert torch.equal(empty, batch["pixels"])


def _layer_inputs(detector, images, masks, layer=6):
    batch = detector.preprocess(images, masks=masks)
    x = normalize(batch["pixels"], detector.config.image.mean, detector.config.image.std)
    blended = self_blend(batch["pixels"], batch["hull"], batch["seeds"].tolist(), detector.config.sbi)
    with torch.no_grad():
        ours = detector.backbone.hidden_states(x)[layer][:, 1:]
        theirs = detector.backbone.hidden_states(normalize(blended, detector.config.image.mean,
                                                           detector.config.image.std))[layer][:, 1:]
    membership = detector.membership(batch["hull"], batch["seeds"])
    return ours, theirs, membership


def test_masks_anchors_and_pooling(disks):
    images, masks, _ = disks
    detector = build_detector("corit", tiny_corit())
    tokens, counterpart, membership = _layer_inputs(detector, images, masks)
    proxy = tokens - counterpart
    anchor, direction = region_anchors(proxy, membership)
    norms = direction.norm(dim=-1)
    assert torch.allclose(norms[anchor.norm(dim=-1) > 0], torch.ones(1), atol=1e-5)  # unit-norm anchors
    refined = refinement_masks(proxy, membership, tau=0.1)
    assert not (refined.bool() & ~membership).any()  # masks within their regions
    assert refined.sum() < membership.sum()  # and refined
    everything = refinement_masks(proxy, membership, tau=-math.inf)
    assert torch.equal(everything.bool(), membership)
    plain = (membership.float() @ tokens) / membership.float().sum(-1, keepdim=True)
    torch.testing.assert_close(region_pool(tokens, everything), plain, atol=1e-5, rtol=1e-5)
    nothing = refinement_masks(proxy, membership, tau=1e9)
    assert nothing.sum() == 0
    for mode in ("avg", "max"):
        pooled = region_pool(tokens, nothing, mode)
        assert torch.isfinite(pooled).all() and pooled.abs().max() == 0
    maxed = region_pool(tokens, membership.float(), "max")
    k, b = 0, 0
    assert torch.equal(maxed[b, k], tokens[b][membership[b, k]].amax(0))


def test_hri_output_shape_and_frozen_backbone(disks):
    images, masks, labels = disks
    detector = build_detector("corit", tiny_corit())
    batch = detector.collate(images, labels, masks=masks)
    assert detector.extract_features(batch).shape == (4, 2 * (3 + 1), 64)
    assert not any(p.requires_grad for p in detector.backbone.parameters())
    detector.loss(batch)["loss"].backward()
    assert all(p.grad is None for p in detector.backbone.parameters())
    assert [n for n, _ in detector.trainable_parameters()] == ["classifier.weight", "classifier.bias"]
    assert detector.classifier.in_features == 8 * 64


@pytest.mark.parametrize("overrides, tokens", [
    ({"use_hri": False}, 4), ({"use_rsi": False}, 2), ({"regions": ["F"]}, 4), ({"regions": ["random"]}, 8),
    ({"use_rrm": False}, 8), ({"pool": "max"}, 8), ({"region_attn": "joint"}, 8), ({"region_source": "saliency"}, 8),
    ({"region_source": "ellipse"}, 8),
])
def test_ablations_change_the_token_set(disks, overrides, tokens):
    images, masks, _ = disks
    detector = build_detector("corit", tiny_corit(**overrides))
    features = detector.extract_features(detector.preprocess(images, masks=masks))
    assert features.shape == (4, tokens, 64) and torch.isfinite(features).all()


def test_one_way_default_keeps_clip_tokens_and_differs_from_joint(disks):
    images, masks, _ = disks
    one_way = build_detector("corit", tiny_corit())
    joint = build_detector("corit", tiny_corit(region_attn="joint"))
    batch = one_way.preprocess(images, masks=masks)
    a, b = one_way.extract_features(batch), joint.extract_features(batch)
    x = normalize(batch["pixels"], one_way.config.image.mean, one_way.config.image.std)
    with torch.no_grad():
        vanilla = one_way.backbone.hidden_states(x)
    assert torch.equal(a[:, 0], vanilla[9][:, 0].float()) and torch.equal(a[:, 4], vanilla[12][:, 0].float())
    assert not torch.allclose(a[:, 0], b[:, 0])  # with joint attention the CLS sees the region tokens


def test_fusion_and_head_options_score(disks):
    images, masks, _ = disks
    for overrides in ({"fusion": "xattn"}, {"head": "mlp", "mlp_hidden": 16}, {"head_space": "projection"}):
        detector = build_detector("corit", tiny_corit(**overrides))
        assert detector(detector.preprocess(images, masks=masks)).shape == (4,)


def test_all_ablations_off_is_exactly_a_unifd_linear_probe(disks):
    images, _, _ = disks
    for space in ("post_ln", "projection"):
        detector = build_detector("corit", tiny_corit(head_space=space, **ABLATED))
        batch = detector.preprocess(images)
        x = normalize(batch["pixels"], detector.config.image.mean, detector.config.image.std)
        with torch.no_grad():
            embedding = detector.backbone.vision(pixel_values=x).pooler_output  # post_layernorm(CLS of layer L)
            if space == "projection":
                embedding = detector.backbone.projection(embedding)
            probe = torch.sigmoid(embedding @ detector.classifier.weight.T + detector.classifier.bias).squeeze(-1)
        assert detector.classifier.in_features == embedding.shape[-1]
        torch.testing.assert_close(torch.tensor(detector.predict_proba(images)), probe, atol=1e-6, rtol=1e-6)


def test_use_hri_alone_concatenates_the_cls_of_l_m_and_l(disks):
    images, _, _ = disks
    detector = build_detector("corit", tiny_corit(use_rsi=False, use_rrm=False))
    batch = detector.preprocess(images)
    x = normalize(batch["pixels"], detector.config.image.mean, detector.config.image.std)
    with torch.no_grad():
        states = detector.backbone.hidden_states(x)
    expected = torch.stack([states[9][:, 0], states[12][:, 0]], dim=1)
    assert torch.equal(detector.extract_features(batch), expected)


@pytest.mark.parametrize("overrides, message", [
    ({"regions": ["F", "Face"]}, "regions"), ({"l_m": 12}, "l_m"), ({"fusion": "xattn", "use_hri": False}, "xattn"),
    ({"image": {"resize": 32, "train_hflip": True}}, "train_hflip"), ({"saliency_top": 0.0}, "saliency_top"),
])
def test_invalid_configs_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_detector("corit", tiny_corit(**overrides))


# ---------------------------------------------------------------------------------------------- SAM
def _quadratic_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(5, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=gen))
        model.bias.copy_(torch.randn(1, generator=gen))
    data, target = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
    return model, lambda: ((model(data) - target) ** 2).mean()


def test_sam_perturbs_by_rho_and_restores_the_weights_before_the_base_step():
    model, loss_fn = _quadratic_problem()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn().backward()
    sam.first_step(zero_grad=True)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert math.isclose(moved.norm().item(), 0.3, rel_tol=1e-5) and math.isclose(sam.last_perturbation_norm, 0.3,
                                                                                 rel_tol=1e-5)
    loss_fn().backward()
    sam.second_step()  # lr = 0: the base step changes nothing, so the weights must be exactly the originals
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_sam_with_rho_zero_is_the_base_optimiser():
    model_a, loss_a = _quadratic_problem()
    model_b, loss_b = _quadratic_problem()
    sam = SAM(model_a.parameters(), torch.optim.Adam, rho=0.0, lr=0.05)
    adam = torch.optim.Adam(model_b.parameters(), lr=0.05)
    for _ in range(10):
        sam.zero_grad()
        loss_a().backward()
        sam.step(lambda: (lambda loss: (loss.backward(), loss)[1])(loss_a()))
        adam.zero_grad()
        loss_b().backward()
        adam.step()
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_sam_gradient_is_taken_at_the_perturbed_point():
    model, loss_fn = _quadratic_problem()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_fn().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    perturbed, perturbed_loss = _quadratic_problem()
    with torch.no_grad():
        for p, w, g in zip(perturbed.parameters(), w0, grads):
            p.copy_(w + 0.5 * g / norm)
    perturbed_loss().backward()
    sam.step(lambda: (lambda loss: (loss.backward(), loss)[1])(loss_fn()))
    for p, w, q in zip(model.parameters(), w0, perturbed.parameters()):
        torch.testing.assert_close(p.detach(), w - 0.1 * q.grad)


def test_corit_optimiser_is_sam_and_the_loss_goes_down_on_a_fixed_batch(disks):
    images, masks, labels = disks
    detector = build_detector("corit", tiny_corit())
    optimizer = detector.make_optimizer(lr=1e-2)
    assert isinstance(optimizer, SAM) and optimizer.param_groups[0]["rho"] == 0.05
    batch = detector.collate(images, labels, masks=masks)
    batch["features"] = detector.extract_features(batch)
    losses = [detector.training_step(batch, optimizer)["loss"] for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def test_gsnr_closed_form_matches_per_sample_autograd_gradients():
    gen = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(8, 5, generator=gen), (torch.arange(8) % 2).float()
    head = torch.nn.Linear(5, 1)
    grads = []
    for z, y in zip(inputs, labels):
        head.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head(z[None])[0, 0], y).backward()
        grads.append(torch.cat([head.weight.grad.flatten(), head.bias.grad]))
    grads = torch.stack(grads)
    mean = grads.mean(0)
    expected = mean.pow(2).sum() / (grads - mean).pow(2).sum(1).mean()
    assert linear_head_gsnr(inputs, labels, head.weight, head.bias) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------- behaviour
def _train_and_score(overrides: dict, train, test) -> tuple[float, float]:
    detector = build_detector("corit", tiny_corit(**overrides))
    (train_images, train_masks, train_labels), (test_images, test_masks, test_labels) = train, test
    with torch.no_grad():
        features = detector.extract_features(detector.preprocess(train_images, masks=train_masks))
    labels = torch.tensor(train_labels, dtype=torch.float32)
    optimizer = detector.make_optimizer(lr=1e-2)
    for _ in range(100):
        detector.training_step({"features": features, "labels": labels}, optimizer)
    scores = detector.predict_proba(test_images, masks=test_masks)
    return auc(scores, test_labels), detector.gsnr(features, labels)


def test_behaviour_full_model_detects_local_manipulations():
    train, test = disk_set(0, 128), disk_set(1, 128)
    full_auc, full_gsnr = _train_and_score({}, train, test)
    probe_auc, probe_gsnr = _train_and_score(ABLATED, train, test)
    logger.info("CoRIT test AUC %.4f (GSNR %.3g); UniFD reduction %.4f (GSNR %.3g)", full_auc, full_gsnr,
                probe_auc, probe_gsnr)
    assert full_auc >= 0.8
    assert full_auc >= probe_auc - 0.05
    assert math.isfinite(full_gsnr) and math.isfinite(probe_gsnr) and full_gsnr >= 0
