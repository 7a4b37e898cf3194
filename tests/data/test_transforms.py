"""Image preprocessing (BAGEL resize rule, normalisation, alpha) and the patch / position-id layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.data.images import to_rgb
from unigendet.data.transforms import (
    DEFAULT_MAX_PIXELS,
    VAE_TRANSFORM,
    VIT_TRANSFORM,
    ImageTransform,
    flat_position_ids,
    patchify,
    patchify_latent,
    resize_target_size,
    unpatchify_latent,
    vae_transform,
    vit_transform,
)

BIG = 1 << 30  # pixel budget that never triggers step 2


# --------------------------------------------------------------------------- resize rule


def tiny(width, height, max_pixels=BIG, min_size=32):
    return resize_target_size(width, height, max_size=64, min_size=min_size, stride=16, max_pixels=max_pixels)


def test_bankers_rounding_on_stride():
    # 40x56 fits (scale 1). 40/16 = 2.5 -> round() = 2 -> 32 (half-up would give 48);
    # 56/16 = 3.5 -> 4 -> 64 (banker's rounds half to even).
    assert tiny(40, 56) == (32, 64)


def test_bankers_rounding_on_pixels_then_stride():
    # 128x81, min 16: scale = 64/128 = 0.5. Height: 81*0.5 = 40.5 -> round() = 40, 40/16 = 2.5 -> 2 -> 32.
    # Rounding half up at either step would give 41 -> 48 or 40 -> 48.
    assert tiny(128, 81, min_size=16) == (64, 32)


def test_min_size_upscales():
    # short side 20 < 32: scale = max(min(64/30, 1), 32/20) = 1.6 -> 32x48.
    assert tiny(20, 30) == (32, 48)
    # ViT preset: 100x50 -> scale 224/50 = 4.48 -> 448x224.
    assert VIT_TRANSFORM.target_size(100, 50) == (448, 224)


def test_max_size_downscales():
    # scale = 64/256 = 0.25 (= 32/128, min rule agrees) -> 64x32.
    assert tiny(256, 128) == (64, 32)
    # 1920x1080 at the stock presets: long edge to max_size, short edge to the nearest stride.
    assert VAE_TRANSFORM.target_size(1920, 1080) == (1024, 576)  # 576 = 36*16
    assert VIT_TRANSFORM.target_size(1920, 1080) == (980, 546)  # 1080*980/1920 = 551.25 -> 551 -> 39*14


def test_min_size_then_max_size_step3():
    # 300x100: scale = max(64/300, 32/100) = 0.32 -> 96x32 (long edge too big), then step 3:
    # scale 64/96 -> 64 x round(21.33)=21 -> 21/16 = 1.31 -> 16.
    assert tiny(300, 100) == (64, 16)
    # Extreme ratio: the short side collapses below one stride and is floored at the stride.
    assert tiny(1000, 1) == (64, 16)
    # Stock VAE preset, 2000x100: step 1 gives 10240x512, step 2 (budget) 3520x176, step 3 1024x48.
    assert VAE_TRANSFORM.target_size(2000, 100) == (1024, 48)


def test_pixel_budget_scales_sides_linearly():
    # 64x64 = 4096 px > 2048: each side is multiplied by the area ratio 0.5 (the reference quirk),
    # giving 32x32 = 1024 px; a sqrt(ratio) rule would have given 48x48.
    assert tiny(64, 64, max_pixels=2048) == (32, 32)
    # img_num divides the budget.
    assert resize_target_size(64, 64, 64, 32, 16, 8192, img_num=2) == (64, 64)
    assert resize_target_size(64, 64, 64, 32, 16, 8192, img_num=4) == (32, 32)


@pytest.mark.parametrize("transform", [VAE_TRANSFORM, VIT_TRANSFORM, vae_transform(64, 32), vit_transform(56, 28)])
def test_outputs_divisible_by_stride(transform):
    rng = np.random.default_rng(0)
    for width, height in [(1, 1), (7, 3000), (3000, 7), *rng.integers(1, 2500, size=(60, 2)).tolist()]:
        w, h = transform.target_size(width, height)
        assert w % transform.stride == 0 and h % transform.stride == 0
        assert w >= transform.stride and h >= transform.stride
        assert max(w, h) <= transform.max_size


def test_invalid_sizes():
    with pytest.raises(ValueError):
        tiny(0, 10)
    with pytest.raises(ValueError):
        ImageTransform(64, 32, 0)


def test_presets():
    assert VAE_TRANSFORM == ImageTransform(1024, 512, 16, 14 * 14 * 9 * 1024)
    assert VIT_TRANSFORM == ImageTransform(980, 224, 14, 2_007_040)
    assert DEFAULT_MAX_PIXELS == 1_806_336
    assert vae_transform(max_size=64, min_size=32) == ImageTransform(64, 32, 16, DEFAULT_MAX_PIXELS)
    assert vit_transform(max_size=56, min_size=28).stride == 14


# --------------------------------------------------------------------------- tensors


def test_transform_output_and_normalisation():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(array, "RGB")
    transform = vae_transform(max_size=64, min_size=32)
    x = transform(img)
    w, h = transform.target_size(70, 50)
    assert x.shape == (3, h, w) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # Same numbers as PIL bicubic followed by ToTensor and Normalize(0.5, 0.5).
    ref = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - 0.5) / 0.5
    assert torch.equal(x, ref)


def test_normalisation_exact_values():
    transform = vae_transform(max_size=64, min_size=32)
    white = transform(Image.new("RGB", (32, 32), (255, 255, 255)))
    black = transform(Image.new("RGB", (32, 32), (0, 0, 0)))
    grey = transform(Image.new("RGB", (32, 32), (51, 102, 153)))
    assert torch.all(white == 1.0) and torch.all(black == -1.0)
    expected = torch.tensor([51, 102, 153]) / 255 * 2 - 1
    assert torch.allclose(grey[:, 0, 0], expected, atol=1e-6)


def test_rgba_composited_on_white():
    array = np.zeros((2, 2, 4), dtype=np.uint8)
    array[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    array[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    array[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    array[1, 1] = (0, 0, 255, 0)  # transparent blue -> white
    out = np.asarray(to_rgb(Image.fromarray(array, "RGBA")))
    assert out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])
    assert tuple(out[1, 1]) == (255, 255, 255)
    # The transform applies the same conversion.
    x = vae_transform(max_size=64, min_size=2, stride=2)(Image.fromarray(array, "RGBA"))
    assert torch.all(x[:, 0, 0] == 1.0) and torch.equal(x[:, 0, 1], torch.tensor([1.0, -1.0, -1.0]))


def test_other_modes_to_rgb():
    la = Image.fromarray(np.array([[[0, 0], [200, 255]]], dtype=np.uint8), "LA")
    assert [tuple(p) for p in np.asarray(to_rgb(la))[0]] == [(255, 255, 255), (200, 200, 200)]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert [tuple(p) for p in np.asarray(to_rgb(pal))[0]] == [(255, 255, 255), (10, 20, 30)]
    grey = to_rgb(Image.new("L", (3, 2), 77))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (77, 77, 77)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb).mode == "RGB" and to_rgb(rgb) is not rgb


# --------------------------------------------------------------------------- patch layouts


def coded_image(c, height, width):
    """Value at (ch, y, x) = ch*100 + y*10 + x, so every element names its origin."""
    ch = torch.arange(c).view(c, 1, 1) * 100
    y = torch.arange(height).view(1, height, 1) * 10
    x = torch.arange(width).view(1, 1, width)
    return (ch + y + x).float()


def test_patchify_order_hand_built():
    img = coded_image(3, 4, 6)  # 2x3 grid of 2x2 patches
    rows = patchify(img, 2)
    assert rows.shape == (6, 12)
    # Patch 0 = grid (0, 0): pixel (0,0) channels 0,1,2, then pixel (0,1), then (1,0), (1,1).
    assert rows[0].tolist() == [0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211]
    # Patch 1 = grid (0, 1): columns 2-3 (row-major grid order).
    assert rows[1].tolist() == [2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213]
    # Patch 3 = grid (1, 0): rows 2-3, columns 0-1.
    assert rows[3].tolist() == [20, 120, 220, 21, 121, 221, 30, 130, 230, 31, 131, 231]
    # Patch 5 = grid (1, 2): last patch.
    assert rows[5].tolist() == [24, 124, 224, 25, 125, 225, 34, 134, 234, 35, 135, 235]


def test_patchify_vit_shape_and_errors():
    assert patchify(torch.zeros(3, 28, 42), 14).shape == (6, 588)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(3, 28, 40), 14)
    with pytest.raises(ValueError):
        patchify(torch.zeros(28, 28), 14)


def test_patchify_latent_order_hand_built():
    latent = coded_image(2, 4, 4)  # C=2, 2x2 grid of 2x2 tokens
    tokens = patchify_latent(latent, 2)
    assert tokens.shape == (4, 8)
    # (row in 2x2, col in 2x2, channel)
    assert tokens[0].tolist() == [0, 100, 1, 101, 10, 110, 11, 111]
    assert tokens[1].tolist() == [2, 102, 3, 103, 12, 112, 13, 113]
    assert tokens[2].tolist() == [20, 120, 21, 121, 30, 130, 31, 131]


def test_patchify_latent_round_trip():
    latent = torch.randn(16, 6, 10, generator=torch.Generator().manual_seed(0))
    tokens = patchify_latent(latent)
    assert tokens.shape == (15, 64)
    assert torch.equal(unpatchify_latent(tokens, 3, 5, 2, 16), latent)
    back = torch.randn(12, 3 * 3 * 4)
    assert torch.equal(patchify_latent(unpatchify_latent(back, 3, 4, 3, 4), 3), back)
    with pytest.raises(ValueError):
        unpatchify_latent(tokens, 5, 3, 2, 8)
    with pytest.raises(ValueError, match="divisible"):
        patchify_latent(torch.zeros(16, 5, 4))


def test_flat_position_ids():
    ids = flat_position_ids(2, 3, 70)
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 1, 2, 70, 71, 72]
    assert flat_position_ids(3, 2, 64).tolist() == [0, 1, 64, 65, 128, 129]
    assert flat_position_ids(70, 70, 70)[-1].item() == 70 * 70 - 1
    with pytest.raises(ValueError, match="exceeds"):
        flat_position_ids(71, 1, 70)
    with pytest.raises(ValueError, match="exceeds"):
        flat_position_ids(1, 65, 64)
    with pytest.raises(ValueError):
        flat_position_ids(0, 3, 70)


def test_grid_sizes_match_position_tables():
    # The largest images the presets produce fit the fixed tables (70 ViT patches, 64 latent tokens).
    w, h = VIT_TRANSFORM.target_size(5000, 5000)
    assert flat_position_ids(h // 14, w // 14, 70).numel() == (h // 14) * (w // 14)
    w, h = VAE_TRANSFORM.target_size(5000, 5000)
    assert flat_position_ids(h // 16, w // 16, 64).numel() == (h // 16) * (w // 16)
