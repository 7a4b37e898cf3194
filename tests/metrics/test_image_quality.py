"""Offline generation-quality metrics: fixed image features, Fréchet distance, KID, caption consistency, and the
labelled sample grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageFont

from unigendet.demo.data import DEMO_SOURCES
from unigendet.metrics.image_quality import (
    BLOCK_STANDARDISATION,
    FEATURE_DIM,
    _polynomial_kernel,
    area_resize,
    caption_consistency,
    caption_consistency_features,
    distribution_distances,
    feature_blocks,
    frechet_distance_features,
    image_features,
    kid,
)
from unigendet.utils.images import _fit_line, labelled_grid

SIZE = 64


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """The demo's scikit-image photographs, RGB."""
    out = {}
    for source in DEMO_SOURCES:
        with Image.open(source.path) as img:
            out[source.name] = img.convert("RGB")
    return out


def crops(photo: Image.Image, n: int, rng: np.random.Generator, part: str = "all") -> list[Image.Image]:
    """``n`` random 64-96 px windows of ``photo`` downscaled to 64 px; ``part`` restricts them to the first 70%
    ("train") or the last 30% ("heldout") of the long side."""
    width, height = photo.size
    long_side = max(width, height)
    cut = int(0.7 * long_side)
    lo, hi = {"all": (0, long_side), "train": (0, cut), "heldout": (cut, long_side)}[part]
    out = []
    for _ in range(n):
        window = int(rng.integers(SIZE, SIZE * 3 // 2 + 1))
        along = int(rng.integers(lo, hi - window + 1))
        across = int(rng.integers(0, min(width, height) - window + 1))
        x, y = (along, across) if width >= height else (across, along)
        out.append(photo.crop((x, y, x + window, y + window)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return out


def photo_crops(photos, per_photo: int, seed: int, part: str = "all") -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for name, photo in photos.items():
        images += crops(photo, per_photo, rng, part)
        ids += [name] * per_photo
    return images, ids


def noise_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- features


def test_features_shape_deterministic_and_per_image(photos):
    images, _ = photo_crops(photos, 2, seed=0)
    images.append(images[0].resize((80, 48)))  # any size works
    first = image_features(images)
    assert first.shape == (len(images), FEATURE_DIM) == (27, 205)
    assert first.dtype == np.float64 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, image_features(images))
    # A row depends on its own image only.
    np.testing.assert_array_equal(first[3:4], image_features(images[3:4]))
    assert not np.allclose(first[0], first[1])


def test_feature_blocks_cover_the_row_and_standardisation_is_applied():
    blocks = feature_blocks()
    assert list(blocks) == list(BLOCK_STANDARDISATION)
    assert blocks["thumbnail"].start == 0 and blocks["spectrum"].stop == FEATURE_DIM
    assert all(a.stop == b.start for a, b in zip(list(blocks.values()), list(blocks.values())[1:]))
    # A flat red image: thumbnail pixels (1, 0, 0), no contrast, no gradient, no spectral power (log floor -6).
    feats = image_features([Image.new("RGB", (40, 24), (255, 0, 0))])[0]
    centre, scale = BLOCK_STANDARDISATION["thumbnail"]
    np.testing.assert_allclose(feats[blocks["thumbnail"]].reshape(-1, 3), np.tile([1.0, 0.0, 0.0], (64, 1)) * scale
                               - centre * scale)
    for name, raw in (("channel_std", 0.0), ("gradient", 0.0), ("spectrum", -6.0)):
        centre, scale = BLOCK_STANDARDISATION[name]
        np.testing.assert_allclose(feats[blocks[name]], (raw - centre) * scale, atol=1e-12)


def test_texture_blocks_separate_blur_from_noise(photos):
    images, _ = photo_crops(photos, 1, seed=1)
    blurred = [im.filter(ImageFilter.GaussianBlur(1.5)) for im in images]
    blocks = feature_blocks()
    sharp, soft, noise = (image_features(x) for x in (images, blurred, noise_images(len(images), 0)))
    top_band = blocks["spectrum"].stop - 1
    assert (soft[:, blocks["gradient"]] < sharp[:, blocks["gradient"]]).all()
    assert (soft[:, top_band] < sharp[:, top_band]).all()
    assert noise[:, top_band].min() > sharp[:, top_band].max()
    assert noise[:, blocks["gradient"]].min() > sharp[:, blocks["gradient"]].max()


def test_area_resize_is_an_area_average():
    rng = np.random.default_rng(0)
    x = rng.random((64, 48, 3))
    np.testing.assert_allclose(area_resize(x, 8, 8), x.reshape(8, 8, 8, 6, 3).mean(axis=(1, 3)))
    odd = rng.random((37, 23))
    np.testing.assert_allclose(area_resize(odd, 5, 3).mean(), odd.mean())  # equal-area cells keep the mean


def test_features_reject_bad_input():
    with pytest.raises(ValueError, match="at least one image"):
        image_features([])
    with pytest.raises(ValueError, match="image 1 is 6x20"):
        image_features([Image.new("RGB", (16, 16)), Image.new("RGB", (6, 20))])


# ---------------------------------------------------------------------------------------------- distances


def test_frechet_distance_zero_for_a_set_and_large_for_noise(photos):
    reals_a, _ = photo_crops(photos, 4, seed=2)
    reals_b, _ = photo_crops(photos, 4, seed=3)
    a, b, noise = image_features(reals_a), image_features(reals_b), image_features(noise_images(52, 1))
    assert abs(frechet_distance_features(a, a)) < 1e-4
    same = frechet_distance_features(a, b)
    assert 0 < same < 0.2 * frechet_distance_features(a, noise)
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance_features(a[:1], b)
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance_features(a, b[:, :10])


def test_kid_near_zero_for_same_distribution_and_large_for_noise(photos):
    reals_a, _ = photo_crops(photos, 8, seed=4)
    reals_b, _ = photo_crops(photos, 8, seed=5)  # disjoint draws from the same photographs
    a, b = image_features(reals_a), image_features(reals_b)
    mean, std = kid(a, b, subsets=50, subset_size=40, seed=0)
    assert std > 0 and abs(mean) < std
    noise_mean, noise_std = kid(a, image_features(noise_images(100, 2)), subsets=50, subset_size=40, seed=0)
    assert noise_mean > 10 * noise_std and noise_mean > 50 * abs(mean)
    assert kid(a, b, subsets=5, subset_size=40, seed=3) == kid(a, b, subsets=5, subset_size=40, seed=3)


def test_kid_small_sets_use_the_smaller_size_and_match_a_direct_estimate():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 5)), rng.normal(1.0, 1.0, size=(4, 5))
    # Subsets of size min(1000, 3, 4) = 3: the whole of x; average the direct estimate over y's 4 subsets of 3.
    direct = []
    for drop in range(4):
        ys = np.delete(y, drop, axis=0)
        within = sum(_polynomial_kernel(u[i:i + 1], u[j:j + 1])[0, 0]
                     for u in (x, ys) for i in range(3) for j in range(3) if i != j) / 6
        cross = sum(_polynomial_kernel(x[i:i + 1], ys[j:j + 1])[0, 0] for i in range(3) for j in range(3)) / 9
        direct.append(within - 2 * cross)
    mean, _ = kid(x, y, subsets=400, seed=0)
    assert mean == pytest.approx(np.mean(direct), rel=0.05)
    assert min(direct) <= mean <= max(direct)
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, y, subset_size=1)
    with pytest.raises(ValueError, match="non-finite"):
        kid(x, np.full_like(y, np.nan))


def test_distribution_distances_report(photos):
    reals, _ = photo_crops(photos, 2, seed=6)
    report = distribution_distances(reals, noise_images(10, 3), kid_subsets=10)
    assert set(report) == {"fd", "kid", "kid_std", "n_a", "n_b"}
    assert (report["n_a"], report["n_b"]) == (26, 10) and report["fd"] > 1 and report["kid"] > 0


# ---------------------------------------------------------------------------------------------- consistency


def test_consistency_is_one_for_the_captioned_photographs(photos):
    refs, ids = photo_crops(photos, 3, seed=7)
    exact = caption_consistency(refs, ids, refs, ids)
    assert exact["score"] == 1.0 and exact["n"] == 39 and exact["chance"] == pytest.approx(1 / 13)
    assert exact["per_photo"]["moon"] == {"n": 3, "score": 1.0}
    rng = np.random.default_rng(0)
    perturbed = [Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + rng.integers(-3, 4, (SIZE, SIZE, 3)),
                                         0, 255).astype(np.uint8)) for im in refs]
    assert caption_consistency(perturbed, ids, refs, ids)["score"] == 1.0
    assert caption_consistency(perturbed, ids, refs, ids, distance="thumbnail")["score"] == 1.0


def test_consistency_is_chance_for_random_photographs(photos):
    refs, ids = photo_crops(photos, 4, seed=8)
    names = list(photos)
    rng = np.random.default_rng(9)
    generated, captioned = [], []
    for _ in range(390):  # each image shows a random photograph; its caption is for another random one
        generated += crops(photos[names[rng.integers(len(names))]], 1, rng)
        captioned.append(names[rng.integers(len(names))])
    result = caption_consistency(generated, captioned, refs, ids)
    assert abs(result["score"] - result["chance"]) < 0.045  # ~3.4 binomial standard errors at n = 390


def test_consistency_recognises_unseen_crops_of_the_photograph(photos):
    refs, ids = photo_crops(photos, 8, seed=10, part="train")
    unseen, unseen_ids = photo_crops(photos, 4, seed=11, part="heldout")
    score = caption_consistency(unseen, unseen_ids, refs, ids)["score"]
    assert score > 5 * (1 / 13)


def test_consistency_rejects_bad_input():
    feats, ids = np.zeros((3, 4)), ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 generated images but 2"):
        caption_consistency_features(feats, ids[:2], feats, ids)
    with pytest.raises(ValueError, match="3 reference images but 1"):
        caption_consistency_features(feats, ids, feats, ids[:1])
    with pytest.raises(ValueError, match="at least one generated"):
        caption_consistency_features(np.zeros((0, 4)), [], feats, ids)
    with pytest.raises(ValueError, match="without any reference image: z"):
        caption_consistency_features(feats, ["a", "z", "c"], feats, ids)
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="1 generated images but 2"):
        caption_consistency([image], ["a", "b"], [image], ["a"])
    with pytest.raises(ValueError, match="at least one generated"):
        caption_consistency([], [], [image], ["a"])
    with pytest.raises(ValueError, match="distance must be one of"):
        caption_consistency([image], ["a"], [image], ["a"], distance="pixels")


# ---------------------------------------------------------------------------------------------- labelled grid


def _non_white(region: Image.Image) -> int:
    return int((np.asarray(region).min(axis=2) < 200).sum())


def test_labelled_grid_layout_and_text():
    tiles = [Image.new("RGB", (32, 32), (0, 0, 255 - 40 * i)) for i in range(5)]
    labels = ["a photograph of a tabby cat\nstage1\np(fake)=0.123", "", "x", "two\nlines", "y"]
    grid = labelled_grid(tiles, labels, columns=3, pad=2, min_cell_width=70)
    line_h = ImageFont.load_default().getbbox("Agy|")[3] + 2
    cell_w, cell_h = 70, 32 + 3 * line_h
    assert grid.size == (3 * cell_w + 4 * 2, 2 * cell_h + 3 * 2)
    for i in range(5):
        r, c = divmod(i, 3)
        left, top = 2 + c * (cell_w + 2), 2 + r * (cell_h + 2)
        strip = grid.crop((left, top + 32, left + cell_w, top + cell_h))
        assert (_non_white(strip) > 0) == bool(labels[i]), i
        tile_x = left + (cell_w - 32) // 2
        assert grid.getpixel((tile_x + 16, top + 16)) == tiles[i].getpixel((0, 0))
    # The second row's first label has two lines: text in its first and second line slots, none in the third.
    left, top = 2, 2 + cell_h + 2 + 32
    assert _non_white(grid.crop((left, top + line_h, left + cell_w, top + 2 * line_h))) > 0
    assert _non_white(grid.crop((left, top + 2 * line_h, left + cell_w, top + 3 * line_h))) == 0
    assert labelled_grid(tiles, labels, columns=3).tobytes() == labelled_grid(tiles, labels, columns=3).tobytes()


def test_labelled_grid_shortens_long_lines_and_checks_input():
    font = ImageFont.load_default()
    cut = _fit_line("a photograph of a tabby cat", font, 64)
    assert cut.endswith("...") and font.getlength(cut) <= 64 and "a photograph".startswith(cut[:-3][:12])
    assert _fit_line("stage1", font, 64) == "stage1"
    tiles = [Image.new("RGB", (16, 16))] * 2
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        labelled_grid(tiles, ["x"], columns=2)
    with pytest.raises(ValueError, match="at least one image"):
        labelled_grid([], [], columns=2)
