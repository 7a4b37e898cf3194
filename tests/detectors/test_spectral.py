"""Spectral detector: exact peak bins of an 8-px grid, float32 end to end, any size, learned and reference scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_data import auc
from PIL import Image

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import build_detector, load_detector
from unigendet.detectors.spectral import grayscale, median_filter, radial_profile, spectral_map


def grid_image(height: int, width: int, period: int = 8, amplitude: float = 60.0, base=None) -> Image.Image:
    """Bright lines every ``period`` pixels (rows and columns) over ``base`` (default flat grey)."""
    image = np.full((height, width), 100.0) if base is None else base.astype(np.float64)
    image[::period, :] += amplitude
    image[:, ::period] += amplitude
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth 1/f noise in [0, 255]."""
    spectrum = np.fft.fft2(rng.normal(size=(height, width)))
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    field = np.real(np.fft.ifft2(spectrum / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))))
    field = (field - field.min()) / (field.max() - field.min())
    return 40 + 170 * field


def noise_set(seed: int, n: int, size: int = 64):
    """n images alternating smooth 1/f noise (real) and the same kind of noise plus an 8-px grid (fake)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        base = pink_noise(rng, size, size)
        if i % 2:
            images.append(grid_image(size, size, amplitude=rng.uniform(6, 14), base=base))
        else:
            images.append(Image.fromarray(base.astype(np.uint8)))
        labels.append(i % 2)
    return images, labels


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)])
def test_an_8px_grid_puts_energy_exactly_at_multiples_of_n_over_8(height, width):
    values = spectral_map(grayscale(grid_image(height, width)))
    cy, cx = height // 2, width // 2
    strong = values > 0.05 * values.max()
    ky, kx = torch.nonzero(strong, as_tuple=True)
    assert ((ky - cy) % (height // 8) == 0).all() and ((kx - cx) % (width // 8) == 0).all()
    for y, x in ((cy, cx + width // 8), (cy, cx - width // 8), (cy + height // 8, cx), (cy - height // 8, cx)):
        assert strong[y, x]
        assert values[y, x] > values[y, x + 1] + 1 and values[y, x] > values[y + 1, x] + 1


def test_grid_peaks_stand_out_of_natural_noise_at_the_same_bins():
    rng = np.random.default_rng(0)
    base = pink_noise(rng, 64, 64)
    plain = spectral_map(grayscale(Image.fromarray(base.astype(np.uint8))))
    gridded = spectral_map(grayscale(grid_image(64, 64, amplitude=20, base=base)))
    residual = gridded - median_filter(gridded, 5)
    for y, x in ((32, 40), (32, 24), (40, 32), (24, 32)):
        assert residual[y, x] > 1.0 and gridded[y, x] > plain[y, x] + 1.0
        assert gridded[y, x] == gridded[y - 1:y + 2, x - 1:x + 2].max()


def test_maps_and_features_stay_float32_for_any_size_and_mode():
    detector = build_detector("spectral", {"max_side": 64})
    for size, mode in (((17, 33), "RGB"), ((200, 120), "L"), ((64, 64), "RGBA"), ((9, 9), "I;16")):
        image = Image.new(mode, size)
        values = detector.spectral_map(image)
        assert values.dtype == torch.float32 and values.shape == (min(size[1], 64), min(size[0], 64))
        assert detector.preprocess([image])["spectral_features"].dtype == torch.float32
    with pytest.raises(TypeError, match="float32"):
        spectral_map(torch.zeros(8, 8, dtype=torch.float16))


def test_radial_profile_of_a_radial_function():
    values = torch.ones(32, 32)
    assert torch.allclose(radial_profile(values, 8), torch.ones(8))


def test_learned_scorer_separates_grids_from_smooth_noise():
    train_images, train_labels = noise_set(0, 64)
    test_images, test_labels = noise_set(1, 64)
    detector = build_detector("spectral", {"radial_bins": 16})
    detector.fit(train_images, train_labels)
    assert auc(detector.predict_proba(test_images), test_labels) >= 0.95


def test_learned_scorer_trains_by_gradient_like_any_head():
    images, labels = noise_set(2, 16)
    detector = build_detector("spectral", {"radial_bins": 16, "hidden": 8})
    detector.fit_statistics(images, labels)
    batch = detector.collate(images, labels)
    optimizer = detector.make_optimizer()
    losses = [detector.training_step(batch, optimizer)["loss"] for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]


def test_reference_mode_scores_by_distance_to_real_images(tmp_path):
    train_images, train_labels = noise_set(0, 64)
    test_images, test_labels = noise_set(1, 64)
    detector = build_detector("spectral", {"mode": "reference", "radial_bins": 16})
    assert detector.trainable_parameters() == []
    with pytest.raises(RuntimeError, match="fit_statistics"):
        detector.predict_proba(test_images[:1])
    detector.fit_statistics(train_images, train_labels)
    assert detector.reference_distances.numel() == 32
    scores = detector.predict_proba(test_images)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert auc(scores, test_labels) >= 0.9
    detector.save_pretrained(tmp_path)
    assert load_detector(tmp_path).predict_proba(test_images) == scores


def test_analyze_returns_the_map_for_audit_records():
    images, labels = noise_set(3, 8)
    detector = build_detector("spectral", {"radial_bins": 16})
    detector.fit(images, labels)
    analysis = detector.analyze(images[1])
    assert analysis.map.shape == (64, 64) and analysis.map.dtype == torch.float32
    assert analysis.features.shape == (18,)
    assert analysis.score == pytest.approx(detector.predict_proba([images[1]])[0], abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"median_kernel": 4}, "median_kernel"), ({"hf_radius": 1.5}, "hf_radius"), ({"mode": "mahalanobis"}, "mode"),
])
def test_invalid_configs_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_detector("spectral", overrides)
