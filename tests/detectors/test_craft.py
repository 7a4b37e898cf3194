"""CRAFT on tiny random diffusers/transformers components (CPU, no downloads): DDIM maths, perturbation geometry,
the real-class centre, the contrastive loss, gradient routing, learning, strict loading and save/load."""

from __future__ import annotations

import types

import pytest
import torch
from detector_data import smooth_field_set
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import CheckpointKeyError, build_detector, detector_config, load_detector
from unigendet.detectors.craft import CraftConfig, contrastive_reconstruction_loss
from unigendet.detectors.craft_pipeline import build_components, perturb_latent, save_components
from unigendet.recipes import recipe_path


def tiny_config(**overrides) -> CraftConfig:
    words = [f"{k}={v}" for k, v in overrides.items()]
    return detector_config("craft", recipe_path("detectors/craft_tiny.yaml"), words)


@pytest.fixture(scope="module")
def tiny():
    return build_detector("craft", tiny_config())


@pytest.fixture(scope="module")
def data():
    return smooth_field_set(0, 8)


class ZeroUNet(nn.Module):
    """Predicts zero noise: DDIM inversion and reconstruction are then pure rescalings."""

    def forward(self, x, t, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------- DDIM
def test_ddim_inversion_then_reconstruction_is_exact_with_a_zero_unet(tiny):
    z0 = torch.randn(2, 4, 16, 16)
    cond = torch.zeros(2, 1, 32)
    zero = ZeroUNet()
    zt = tiny.invert(z0, cond, unet=zero)
    assert not torch.allclose(zt, z0, atol=1e-2)  # the inversion moved the latent (it scales it up)
    saved = tiny.frozen["unet"], tiny.tuned["unet"]
    try:
        tiny.frozen["unet"], tiny.tuned["unet"] = zero, zero
        back = tiny.reconstruct_latent(zt, cond, cond)
    finally:
        tiny.frozen["unet"], tiny.tuned["unet"] = saved
    torch.testing.assert_close(back, z0, atol=1e-5, rtol=1e-5)


class TimeOnlyUNet(nn.Module):
    """Noise that depends on the timestep only: exact round trips need inversion step i and reverse step i to
    evaluate the same timestep and move between the same two noise levels."""

    def forward(self, x, t, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=torch.full_like(x, float(t) / 1000.0 - 0.3))


def test_round_trip_is_exact_when_the_noise_does_not_depend_on_the_latent(tiny):
    z0 = torch.randn(2, 4, 16, 16)
    cond = torch.zeros(2, 1, 32)
    unet = TimeOnlyUNet()
    saved = tiny.frozen["unet"], tiny.tuned["unet"]
    try:
        tiny.frozen["unet"], tiny.tuned["unet"] = unet, unet
        zt = tiny.invert(z0, cond)
        back = tiny.reconstruct_latent(zt, cond, cond)
    finally:
        tiny.frozen["unet"], tiny.tuned["unet"] = saved
    assert (zt - z0).abs().mean() > 0.1
    torch.testing.assert_close(back, z0, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- perturbation
def test_perturbation_geometry():
    torch.manual_seed(0)
    z, mu = torch.randn(3, 4, 4, 4), torch.randn(4, 4, 4)
    step = 0.7
    moved = perturb_latent(z, mu, step, bound=1e9, eps=0.0)
    delta = (moved - z).flatten(1)
    torch.testing.assert_close(delta.norm(dim=1), torch.full((3,), step))  # ||z' - z|| = lambda before clipping
    direction = (z - mu).flatten(1)
    direction = direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(delta / step, direction, atol=1e-5, rtol=1e-5)  # pushed away from mu
    bound = 0.5 * moved.flatten(1).norm(dim=1).min().item()
    clipped = perturb_latent(z, mu, step, bound=bound)
    assert (clipped.flatten(1).norm(dim=1) <= bound * (1 + 1e-5)).all()
    at_centre = perturb_latent(mu.expand(2, -1, -1, -1), mu, step, bound=1e9)
    assert torch.isfinite(at_centre).all()
    torch.testing.assert_close(at_centre, mu.expand(2, -1, -1, -1))


def test_default_step_and_bound_follow_kappa(tiny):
    dim = 4 * 16 * 16
    assert tiny.step_size == pytest.approx(0.1 * dim ** 0.5) and tiny.bound == pytest.approx(1.1 * dim ** 0.5)


# ---------------------------------------------------------------------------------------------- real centre
def test_real_centre_moves_only_with_real_samples_and_survives_save_load(tmp_path, data):
    detector = build_detector("craft", tiny_config())
    detector.train()
    images, labels = data
    fakes = [im for im, y in zip(images, labels) if y == 1][:2]
    with torch.no_grad():
        detector.loss(detector.collate(fakes, [1, 1], train=True))
    assert float(detector.mu_real_count) == 0 and detector.mu_real.abs().sum() == 0
    with torch.no_grad():
        batch = detector.collate(images[:4], labels[:4], train=True)
        z = detector.extract_features(batch)
        detector.loss(batch)
    reals = [i for i, y in enumerate(labels[:4]) if y == 0]
    assert float(detector.mu_real_count) == len(reals)
    torch.testing.assert_close(detector.mu_real, z[reals].mean(0), atol=1e-5, rtol=1e-5)
    before = detector.mu_real.clone()
    with torch.no_grad():
        detector.loss(detector.collate(fakes, [1, 1], train=True))
    torch.testing.assert_close(detector.mu_real, before)
    loaded = load_detector(detector.save_pretrained(tmp_path / "craft"))
    torch.testing.assert_close(loaded.mu_real, before)
    assert float(loaded.mu_real_count) == len(reals)


# ---------------------------------------------------------------------------------------------- losses
def test_contrastive_reconstruction_loss_piecewise():
    d = torch.tensor([0.2, 0.5, 0.9, 0.2, 0.5, 0.9])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    gamma = 2.0
    loss = contrastive_reconstruction_loss(d, labels, margin=0.4, delta=0.3, gamma=gamma)
    torch.testing.assert_close(loss, torch.tensor([0.2, 0.0, gamma * 0.2, 0.2, 0.5, 0.9]))


# ---------------------------------------------------------------------------------------------- gradients
def test_gradient_routing_and_learning_rate_groups(data):
    detector = build_detector("craft", tiny_config())
    detector.train()
    detector.unet_calls.reset()
    out = detector.loss(detector.collate(data[0][:4], data[1][:4], train=True))
    assert detector.unet_calls.with_grad == detector.config.k == 2
    assert detector.unet_calls.without_grad == 5 + (5 - 2)  # inversion + frozen reverse steps
    out["loss"].backward()
    frozen = list(detector.frozen.parameters()) + list(detector.vae.encoder.parameters())
    assert all(p.grad is None for p in frozen)
    for module in (detector.tuned["unet"], detector.tuned["image_encoder"], detector.vae.decoder,
                   detector.classifier):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    defaults = CraftConfig()
    groups = {g["name"]: g["lr"] for g in build_detector("craft", tiny_config(
        lr_encoder=defaults.lr_encoder, lr_unet=defaults.lr_unet, lr_decoder=defaults.lr_decoder,
        lr_classifier=defaults.lr_classifier)).param_groups()}
    assert set(groups) == {"encoder", "unet", "decoder", "classifier"}
    assert groups["decoder"] == pytest.approx(2 * groups["unet"]) and groups["encoder"] == groups["unet"]


def test_shared_mode_and_finetune_subsets_route_gradients(data, tmp_path):
    from unigendet.objectives.detector import DetectorObjective, DetectorStageConfig

    detector = build_detector("craft", tiny_config(terminal_mode="shared", finetune="[decoder]"))
    assert detector.frozen is None and not detector.features_are_deterministic(True)
    with pytest.raises(ConfigError, match="terminal_mode"):  # its inversion trains: no latent cache
        DetectorObjective(DetectorStageConfig(name="craft", cache_dir=str(tmp_path)), detector)
    detector.train()
    detector.unet_calls.reset()
    detector.loss(detector.collate(data[0][:2], data[1][:2], train=True))["loss"].backward()
    assert detector.unet_calls.with_grad == 2
    assert all(p.grad is None for p in detector.tuned.parameters())
    assert {g["name"] for g in detector.param_groups()} == {"decoder", "classifier"}


def test_loss_falls_on_a_fixed_batch(data):
    detector = build_detector("craft", tiny_config(distance="mse", margin=0.05, delta=0.05))
    batch = detector.collate(data[0], data[1], train=True)
    optimizer = detector.make_optimizer()
    losses = [detector.training_step(batch, optimizer)["loss"] for _ in range(6)]
    assert losses[-1] < 0.85 * losses[0]


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="k must be"):
        tiny_config(k=9)
    with pytest.raises(ConfigError, match="finetune"):
        tiny_config(finetune="[vae]")
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_detector("craft", tiny_config(resolution=34))
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        build_detector("craft", tiny_config(**{"pipeline.image_encoder.projection_dim": 16}))


# ---------------------------------------------------------------------------------------------- loading
def test_pipeline_directory_loads_strictly_and_scores_like_its_components(tmp_path, data):
    config = tiny_config()
    components = build_components(config.pipeline)
    root = save_components(components, tmp_path / "pipe")
    from_dir = build_detector("craft", tiny_config(**{"pipeline.path": str(root), "pipeline.init_seed": 7}))
    random = build_detector("craft", config)
    for name in ("unet", "image_encoder"):
        for (key, a), b in zip(from_dir.frozen[name].state_dict().items(), random.frozen[name].state_dict().values()):
            torch.testing.assert_close(a, b, msg=key)
    assert from_dir.config.pipeline.unet["block_out_channels"] == [32, 64]  # geometry adopted from the directory
    expected = random.predict_proba(data[0][:2])
    assert from_dir.predict_proba(data[0][:2]) == pytest.approx(expected, abs=1e-6)
    reloaded = load_detector(from_dir.save_pretrained(tmp_path / "saved"))  # rebuilt from the recorded geometry
    assert reloaded.config.pipeline.path is None
    assert reloaded.predict_proba(data[0][:2]) == pytest.approx(expected, abs=1e-6)

    (root / "feature_extractor" / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        build_detector("craft", tiny_config(**{"pipeline.path": str(root)}))
    save_components(components, root)
    from safetensors.torch import load_file, save_file
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointKeyError, match="unexpected keys.*extra.weight"):
        build_detector("craft", tiny_config(**{"pipeline.path": str(root)}))
    with pytest.raises(ConfigError, match="no such directory"):
        build_detector("craft", tiny_config(**{"pipeline.path": str(tmp_path / "nowhere")}))
    import shutil
    shutil.rmtree(root / "vae")
    with pytest.raises(ConfigError, match="vae is missing"):
        build_detector("craft", tiny_config(**{"pipeline.path": str(root)}))


def test_save_load_gives_identical_scores(tmp_path, data):
    detector = build_detector("craft", tiny_config())
    detector.training_step(detector.collate(data[0], data[1], train=True), detector.make_optimizer())
    expected = detector.predict_proba(data[0])
    loaded = load_detector(detector.save_pretrained(tmp_path / "saved"))
    assert loaded.predict_proba(data[0]) == pytest.approx(expected, abs=1e-6)
    assert float(loaded.mu_real_count) > 0


def test_bf16_autocast_of_the_unet_scores_close_to_fp32_and_trains(data):
    plain = build_detector("craft", tiny_config())
    mixed = build_detector("craft", tiny_config(unet_autocast="bfloat16"))
    assert plain.feature_fingerprint(True) != mixed.feature_fingerprint(True)  # cached latents are not shared
    assert mixed.predict_proba(data[0][:4]) == pytest.approx(plain.predict_proba(data[0][:4]), abs=0.05)
    mixed.train()
    mixed.loss(mixed.collate(data[0][:2], data[1][:2], train=True))["loss"].backward()
    assert mixed.tuned["unet"].conv_in.weight.grad is not None

