"""Tiny configs and synthetic images for the detector tests (no downloads, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

NOISE = 0.06
CHECKER = 0.05
TINY_BACKBONE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                     image_size=32, patch_size=4, projection_dim=16, attn_implementation="eager")


def tiny_ltd(**overrides) -> dict:
    cfg = {"backbone": dict(TINY_BACKBONE), "candidate_layers": [4, 5, 6, 7, 8, 9], "window_n": 3,
           "encoder_heads": 4, "encoder_ffn": 256,
           "image": {"resize": 32, "train_resize": 32, "train_random_crop": False, "train_hflip": False}}
    cfg.update(overrides)
    return cfg


def tiny_corit(**overrides) -> dict:
    cfg = {"backbone": dict(TINY_BACKBONE), "l_m": 9, "xattn_heads": 4,
           "image": {"resize": 32, "train_resize": 32}}
    cfg.update(overrides)
    return cfg


def auc(scores, labels) -> float:
    """ROC AUC by the rank-sum formula (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random smooth colour field plus fine noise, [size, size, 3] in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            out[..., c] += rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        out[..., c] += rng.uniform(0.3, 0.7)
    return out + rng.normal(0, NOISE, out.shape)


def checkerboard(size: int) -> np.ndarray:
    """+-1 checkerboard of period 2 px (an up-sampling-like artefact), [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.where((yy + xx) % 2 == 0, 1.0, -1.0)


def _blur(array: np.ndarray) -> np.ndarray:
    padded = np.pad(array, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[dy:dy + array.shape[0], dx:dx + array.shape[1]] for dy in range(3) for dx in range(3)) / 9


def disk_image(rng: np.random.Generator, fake: bool, size: int = 32) -> tuple[Image.Image, np.ndarray]:
    """A textured background with a textured "face" disk; fake: the disk interior re-textured and blurred.
    Returns the image and the disk mask (bool [size, size])."""
    image = _texture(rng, size)
    cy, cx = rng.uniform(0.4, 0.6, 2) * size
    radius = rng.uniform(0.25, 0.33) * size
    yy, xx = np.mgrid[0:size, 0:size]
    mask = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius ** 2
    face = _texture(rng, size)
    image[mask] = face[mask]
    if fake:
        swapped = _blur(_texture(rng, size)) + CHECKER * checkerboard(size)[..., None]
        image[mask] = swapped[mask]
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels), mask


def disk_set(seed: int, n: int, size: int = 32):
    """n images alternating real/fake: (images, masks, labels)."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for i in range(n):
        image, mask = disk_image(rng, fake=bool(i % 2), size=size)
        images.append(image)
        masks.append(mask)
        labels.append(i % 2)
    return images, masks, labels


def smooth_field_set(seed: int, n: int, size: int = 32, amplitude: float = 0.15):
    """Real = smooth random colour fields (4x4 Gaussian noise, bicubic up-sampled); fake = the same kind of field
    plus a period-2 checkerboard of ``amplitude`` (on the [-1, 1] scale). n images alternating real/fake."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        small = rng.normal(0, 0.5, (4, 4, 3)).clip(-1, 1)
        channels = [Image.fromarray(((small[..., c] + 1) * 127.5).astype(np.uint8)).resize((size, size), Image.BICUBIC)
                    for c in range(3)]
        field = np.stack([np.asarray(ch, dtype=np.float64) / 127.5 - 1 for ch in channels], axis=-1)
        if i % 2:
            field = field + amplitude * checkerboard(size)[..., None]
        images.append(Image.fromarray(((field.clip(-1, 1) + 1) * 127.5).astype(np.uint8)))
        labels.append(i % 2)
    return images, labels


def hf_to_openai_visual(backbone) -> dict[str, torch.Tensor]:
    """Our tiny backbone written in OpenAI's ``clip`` layout (independent of the library's converter)."""
    v = backbone.vision
    out = {"visual.conv1.weight": v.embeddings.patch_embedding.weight,
           "visual.class_embedding": v.embeddings.class_embedding,
           "visual.positional_embedding": v.embeddings.position_embedding.weight,
           "visual.ln_pre.weight": v.pre_layrnorm.weight, "visual.ln_pre.bias": v.pre_layrnorm.bias,
           "visual.ln_post.weight": v.post_layernorm.weight, "visual.ln_post.bias": v.post_layernorm.bias,
           "visual.proj": torch.randn(64, 16)}
    for i, layer in enumerate(v.encoder.layers):
        a, p = layer.self_attn, f"visual.transformer.resblocks.{i}."
        out[p + "attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        out[p + "attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        out[p + "attn.out_proj.weight"], out[p + "attn.out_proj.bias"] = a.out_proj.weight, a.out_proj.bias
        for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[p + theirs + ".weight"] = getattr(layer, ours).weight
            out[p + theirs + ".bias"] = getattr(layer, ours).bias
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = layer.mlp.fc1.weight, layer.mlp.fc1.bias
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = layer.mlp.fc2.weight, layer.mlp.fc2.bias
    return {k: t.detach().clone() for k, t in out.items()}
