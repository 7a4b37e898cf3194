"""Generation-quality metrics that need no downloaded weights: a fixed hand-made image feature extractor, a
Fréchet distance and a kernel (KID-style) distance on its features, and a caption-consistency score.

The FID protocol (:mod:`unigendet.metrics.fid`) needs the Inception weights file and 299-pixel inputs; the demo
works offline on 64-pixel images, so it measures on :func:`image_features` instead. Values are comparable only
with values computed by the same extractor at the same settings, never with published FID/KID numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import numpy as np
from PIL import Image

from unigendet.metrics.fid import activation_statistics, frechet_distance

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = 8
SPECTRUM_BANDS = 8
# Band-power shares below this are clipped before the logarithm (a flat image has no power at all).
SPECTRUM_LOG_FLOOR = 1e-6
# (centre, scale) of each feature block: raw values become (raw - centre) * scale. Measured once on 390
# 64-pixel crops (64-96 px windows, bicubic-downscaled) of the 13 scikit-image photographs the demo uses and
# rounded: each block is then centred near 0 with summed variance near 1, so colour layout (192 values),
# contrast (3), sharpness (2) and spectrum (8) weigh about equally in distances, whatever their widths.
BLOCK_STANDARDISATION = {
    "thumbnail": (0.45, 0.35),
    "channel_std": (0.135, 8.0),
    "gradient": (0.065, 17.0),
    "spectrum": (-1.45, 0.67),
}
# ITU-R BT.601 luma weights: the gray image the texture statistics are measured on.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
# Gradient magnitudes are measured on the image and on its 2x area-downsampled copy.
GRADIENT_SCALES = (1, 2)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# Up to this many (a, b) row pairs KID computes whole kernel matrices once (4e6 pairs: 32 MB each).
KID_FULL_KERNEL_MAX_PAIRS = 4_000_000
CONSISTENCY_DISTANCES = ("features", "thumbnail")


# --------------------------------------------------------------------------------------------------
# Features


def image_to_unit_array(image: Image.Image) -> np.ndarray:
    """RGB float64 ``[H, W, 3]`` in [0, 1] (any mode is converted to RGB first)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of an exact area average: output cell ``o`` covers input coordinates
    ``[o * n_in / n_out, (o + 1) * n_in / n_out)`` and each input pixel counts by its overlap with it."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    pixels = np.arange(n_in)[None, :]
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    overlap = np.clip(overlap, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average ``[H, W]`` or ``[H, W, C]`` down (or up) to ``[height, width(, C)]``."""
    rows = _area_matrix(array.shape[0], height)
    cols = _area_matrix(array.shape[1], width)
    if array.ndim == 2:
        return rows @ array @ cols.T
    return np.moveaxis(rows @ np.moveaxis(array, -1, 0) @ cols.T, 0, -1)


def _mean_gradient_magnitude(gray: np.ndarray) -> float:
    """Mean of ``sqrt(dx^2 + dy^2)`` over forward differences (the last row/column has no forward pixel)."""
    dx = gray[:-1, 1:] - gray[:-1, :-1]
    dy = gray[1:, :-1] - gray[:-1, :-1]
    return float(np.sqrt(dx * dx + dy * dy).mean())


def _band_log_shares(gray: np.ndarray) -> np.ndarray:
    """``log10`` of the share of (non-DC) spectral power in each of ``SPECTRUM_BANDS`` equal-width radial
    frequency bands over [0, 0.5] cycles/pixel, shares clipped below at ``SPECTRUM_LOG_FLOOR`` (so in [-6, 0]).

    The mean-removed gray image is multiplied by a 2-D Hann window first, so the image border does not add a
    cross of spurious high-frequency power. Diagonal frequencies above 0.5 cycles/pixel count in the last band.
    """
    height, width = gray.shape
    window = np.outer(np.hanning(height), np.hanning(width))
    power = np.abs(np.fft.fft2((gray - gray.mean()) * window)) ** 2
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij"))
    band = np.minimum((radius / (0.5 / SPECTRUM_BANDS)).astype(int), SPECTRUM_BANDS - 1)
    nonzero = radius > 0
    energy = np.bincount(band[nonzero], weights=power[nonzero], minlength=SPECTRUM_BANDS)
    total = energy.sum()
    # A flat image's "power" is float round-off (~1e-28); one 8-bit step in one pixel already gives ~1e-5.
    shares = energy / total if total > 1e-12 else np.zeros(SPECTRUM_BANDS)
    return np.log10(np.maximum(shares, SPECTRUM_LOG_FLOOR))


def feature_blocks() -> dict[str, slice]:
    """Column ranges of each block in :func:`image_features`'s output, in order."""
    sizes = {"thumbnail": 3 * THUMBNAIL_SIZE**2, "channel_std": 3, "gradient": len(GRADIENT_SCALES),
             "spectrum": SPECTRUM_BANDS}
    blocks, start = {}, 0
    for name, size in sizes.items():
        blocks[name] = slice(start, start + size)
        start += size
    return blocks


FEATURE_DIM = sum(block.stop - block.start for block in feature_blocks().values())


def _raw_blocks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The four blocks of one ``[H, W, 3]`` image in their natural units, before standardisation."""
    gray = rgb @ LUMA_WEIGHTS
    gradients = []
    for scale in GRADIENT_SCALES:
        scaled = gray if scale == 1 else area_resize(gray, gray.shape[0] // scale, gray.shape[1] // scale)
        gradients.append(_mean_gradient_magnitude(scaled))
    return {
        "thumbnail": area_resize(rgb, THUMBNAIL_SIZE, THUMBNAIL_SIZE).ravel(),
        "channel_std": rgb.std(axis=(0, 1)),
        "gradient": np.array(gradients),
        "spectrum": _band_log_shares(gray),
    }


def image_features(images: Sequence[Image.Image]) -> np.ndarray:
    """Fixed, deterministic features ``[N, 205]`` (float64) of PIL images of any size, needing no weights.

    Each image is converted to RGB in [0, 1]; its row concatenates four blocks (column ranges in
    :func:`feature_blocks`), each computed in its natural units and then mapped to ``(raw - centre) * scale``
    with the fixed constants of ``BLOCK_STANDARDISATION``:

    * ``thumbnail`` (192 values): the image area-averaged to 8 x 8 pixels, RGB interleaved per pixel, row-major
      (colour layout: what the image shows);
    * ``channel_std`` (3): the standard deviation of each RGB channel over the image (contrast);
    * ``gradient`` (2): the mean gradient magnitude (forward differences) of the BT.601 gray image at full
      resolution and after a 2x area downsampling (sharpness and fine texture at two scales);
    * ``spectrum`` (8): ``log10`` of the share of the gray image's non-DC power (Hann-windowed FFT) in eight
      equal-width radial frequency bands over [0, 0.5] cycles/pixel, shares clipped below at 1e-6 (blur empties
      the top bands, noise fills them).

    Images must be at least 8 pixels on each side. No randomness and no learned weights are involved.
    """
    if len(images) == 0:
        raise ValueError("image_features needs at least one image")
    rows = []
    for index, image in enumerate(images):
        rgb = image_to_unit_array(image)
        if min(rgb.shape[:2]) < THUMBNAIL_SIZE:
            raise ValueError(f"image {index} is {rgb.shape[1]}x{rgb.shape[0]}; each side must be at least "
                             f"{THUMBNAIL_SIZE} pixels")
        raw = _raw_blocks(rgb)
        rows.append(np.concatenate([(values - BLOCK_STANDARDISATION[name][0]) * BLOCK_STANDARDISATION[name][1]
                                    for name, values in raw.items()]))
    return np.stack(rows)


# --------------------------------------------------------------------------------------------------
# Distribution distances


def _check_feature_pair(a: np.ndarray, b: np.ndarray, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2:
            raise ValueError(f"features {name} must be a 2-D array [N, D], got shape {x.shape}")
        if x.shape[0] < min_rows:
            raise ValueError(f"features {name} need at least {min_rows} rows, got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError(f"features {name} contain non-finite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]`` (N, M >= 2).

    Zero for identical sets; biased upwards for small sets (each covariance is estimated from few rows), so
    compare values only at equal set sizes, or use :func:`kid` whose estimate is unbiased."""
    a, b = _check_feature_pair(a, b, min_rows=2)
    return frechet_distance(*activation_statistics(a), *activation_statistics(b))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(x . y / d + 1) ** 3`` for every row pair, d the feature width."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased squared maximum mean discrepancy from the kernel matrices of two equal-size samples: the
    within-sample averages skip the diagonal (a point paired with itself), the cross average keeps all pairs."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(a_feats: np.ndarray, b_feats: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance ``(mean, std)`` between feature sets: the unbiased squared MMD under the kernel
    ``k(x, y) = (x . y / d + 1) ** 3``, averaged over ``subsets`` random draws (without replacement, from
    ``numpy.random.default_rng(seed)``) of ``min(subset_size, N, M)`` rows of each set.

    Its expectation is 0 when both sets come from the same distribution (single draws may be negative);
    ``std`` is the spread over the draws, not a standard error of the mean."""
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    a, b = _check_feature_pair(a_feats, b_feats, min_rows=2)
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    # Small sets: three kernel matrices once, then index them per draw (many tiny BLAS calls are slow on a
    # busy machine). Large sets: the kernel of each draw only.
    whole = a.shape[0] * b.shape[0] <= KID_FULL_KERNEL_MAX_PAIRS
    if whole:
        k_aa, k_bb, k_ab = _polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b)
    values = []
    for _ in range(subsets):
        i = rng.choice(a.shape[0], size, replace=False)
        j = rng.choice(b.shape[0], size, replace=False)
        if whole:
            values.append(_unbiased_mmd2(k_aa[np.ix_(i, i)], k_bb[np.ix_(j, j)], k_ab[np.ix_(i, j)]))
        else:
            x, y = a[i], b[j]
            values.append(_unbiased_mmd2(_polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)))
    return float(np.mean(values)), float(np.std(values))


def distribution_distances(images_a: Sequence[Image.Image], images_b: Sequence[Image.Image], seed: int = 0,
                           kid_subsets: int = KID_SUBSETS) -> dict[str, float]:
    """Fréchet distance and KID between two image sets on :func:`image_features`: keys ``fd``, ``kid``,
    ``kid_std``, ``n_a``, ``n_b``."""
    a, b = image_features(images_a), image_features(images_b)
    kid_mean, kid_std = kid(a, b, subsets=kid_subsets, seed=seed)
    result = {"fd": frechet_distance_features(a, b), "kid": kid_mean, "kid_std": kid_std,
              "n_a": len(images_a), "n_b": len(images_b)}
    logger.debug("distribution distances: %s", result)
    return result


# --------------------------------------------------------------------------------------------------
# Caption consistency


def caption_consistency_features(generated: np.ndarray, generated_photo_ids: Sequence[Hashable],
                                 reference: np.ndarray, reference_photo_ids: Sequence[Hashable]) -> dict:
    """:func:`caption_consistency` on precomputed vectors ``[N, D]`` / ``[M, D]`` (Euclidean nearest neighbour)."""
    generated, reference = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if len(generated_photo_ids) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(generated_photo_ids)} generated photo ids")
    if len(reference_photo_ids) != len(reference):
        raise ValueError(f"{len(reference)} reference images but {len(reference_photo_ids)} reference photo ids")
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("caption consistency needs at least one generated and one reference image")
    known = set(reference_photo_ids)
    missing = sorted({str(pid) for pid in generated_photo_ids if pid not in known})
    if missing:
        raise ValueError(f"generated photo ids without any reference image: {', '.join(missing)}")
    # Squared distances via the expansion |g|^2 - 2 g.r + |r|^2 (argmin is all that is needed).
    sq = (generated**2).sum(1)[:, None] - 2.0 * generated @ reference.T + (reference**2).sum(1)[None, :]
    nearest = np.argmin(sq, axis=1)
    hits = np.array([reference_photo_ids[j] == pid for j, pid in zip(nearest, generated_photo_ids)])
    per_photo = {}
    for pid in dict.fromkeys(generated_photo_ids):
        mask = np.array([g == pid for g in generated_photo_ids])
        per_photo[pid] = {"n": int(mask.sum()), "score": float(hits[mask].mean())}
    return {"score": float(hits.mean()), "chance": 1.0 / len(known), "n": int(len(hits)), "per_photo": per_photo,
            "matches": [bool(h) for h in hits]}


def caption_consistency(generated_images: Sequence[Image.Image], generated_photo_ids: Sequence[Hashable],
                        reference_images: Sequence[Image.Image], reference_photo_ids: Sequence[Hashable],
                        distance: str = "features") -> dict:
    """How often a generated image looks most like a photograph of what its caption describes.

    Every generated image was generated from a caption of photo ``generated_photo_ids[i]``; its nearest
    reference image is the one at the smallest Euclidean distance between :func:`image_features` vectors
    (``distance="features"``: colour layout plus texture statistics) or between their thumbnail blocks alone
    (``distance="thumbnail"``). Returns ``score`` (the fraction of generated images whose nearest reference
    belongs to the same photo id), ``chance`` (1 / number of distinct reference photo ids: the score of images
    unrelated to their captions when each photo has equally many references), ``n`` (generated images) and
    ``per_photo`` (``{photo id: {"n": images, "score": fraction}}``, in first-appearance order) and ``matches``
    (per generated image, whether its nearest reference is of its photo id: for paired comparisons).
    """
    if distance not in CONSISTENCY_DISTANCES:
        raise ValueError(f"distance must be one of {CONSISTENCY_DISTANCES}, got {distance!r}")
    if len(generated_images) != len(generated_photo_ids):
        raise ValueError(f"{len(generated_images)} generated images but {len(generated_photo_ids)} photo ids")
    if len(reference_images) != len(reference_photo_ids):
        raise ValueError(f"{len(reference_images)} reference images but {len(reference_photo_ids)} photo ids")
    if not generated_images or not reference_images:
        raise ValueError("caption consistency needs at least one generated and one reference image")
    generated, reference = image_features(generated_images), image_features(reference_images)
    if distance == "thumbnail":
        block = feature_blocks()["thumbnail"]
        generated, reference = generated[:, block], reference[:, block]
    return caption_consistency_features(generated, generated_photo_ids, reference, reference_photo_ids)
