"""SigLIP NaViT encoder: key layout, per-image attention isolation, patch-embedding conversion, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unigendet.models.config import ViTConfig
from unigendet.models.siglip import SiglipNaViT, convert_conv2d_to_linear

PATCH = 4
MAX_SIDE = 8


def tiny_cfg(**overrides) -> ViTConfig:
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        patch_size=PATCH,
        max_num_patch_per_side=MAX_SIDE,
    )
    kw.update(overrides)
    return ViTConfig(**kw)


def patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """(3, H, W) -> (H/p · W/p, p·p·3), grid row-major, (pixel row, pixel col, channel) inside a patch."""
    c, h, w = image.shape
    x = image.reshape(c, h // p, p, w // p, p)  # c, gh, pr, gw, pc
    x = x.permute(1, 3, 2, 4, 0)  # gh, gw, pr, pc, c
    return x.reshape((h // p) * (w // p), p * p * c)


def position_ids(gh: int, gw: int) -> torch.Tensor:
    rows = torch.arange(gh)[:, None].expand(gh, gw)
    cols = torch.arange(gw)[None, :].expand(gh, gw)
    return (rows * MAX_SIDE + cols).reshape(-1)


def make_image(gh: int, gw: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, gh * PATCH, gw * PATCH, generator=g) * 2 - 1
    return img, patchify(img, PATCH), position_ids(gh, gw)


def run(model, items):
    pixels = torch.cat([it[1] for it in items])
    pos = torch.cat([it[2] for it in items])
    seqlens = torch.tensor([it[1].shape[0] for it in items])
    return model(pixels, pos, seqlens)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SiglipNaViT(tiny_cfg()).eval()


def test_state_dict_keys_exact(model):
    cfg = model.cfg
    expected = {
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
    }
    for j in range(cfg.num_hidden_layers):
        pre = f"vision_model.encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected |= {f"{pre}self_attn.{proj}.weight", f"{pre}self_attn.{proj}.bias"}
        for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"{pre}{name}.weight", f"{pre}{name}.bias"}
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["vision_model.embeddings.patch_embedding.weight"].shape == (32, PATCH * PATCH * 3)
    assert sd["vision_model.embeddings.position_embedding.weight"].shape == (MAX_SIDE**2, 32)
    assert sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (64, 32)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_has_no_cross_image_leakage(attn):
    torch.manual_seed(0)
    model = SiglipNaViT(tiny_cfg(), attn_implementation=attn).eval()
    a, b, c = make_image(3, 5, 1), make_image(4, 2, 2), make_image(2, 2, 3)
    with torch.no_grad():
        packed = run(model, [a, b, c])
        alone = [run(model, [x]) for x in (a, b, c)]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # Sanity: attention really mixes tokens within an image (otherwise the test above is vacuous).
    with torch.no_grad():
        a_mod = (a[0], a[1].clone(), a[2])
        a_mod[1][0] += 1.0
        changed = run(model, [a_mod])
    assert not torch.allclose(changed[1:], alone[0][1:])


def test_same_length_images_match_alone(model):
    a, b = make_image(3, 3, 4), make_image(3, 3, 5)
    with torch.no_grad():
        packed = run(model, [a, b])
        alone = torch.cat([run(model, [a]), run(model, [b])])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_padded_image_matches_alone(model):
    # The small image gets 24 padding rows in the internal batch; its outputs must not notice.
    big, small = make_image(5, 6, 6), make_image(1, 2, 7)
    with torch.no_grad():
        packed = run(model, [big, small])
        small_alone = run(model, [small])
    torch.testing.assert_close(packed[-small[1].shape[0] :], small_alone, rtol=1e-5, atol=1e-5)


def test_conv_to_linear_matches_conv_patch_embedding():
    torch.manual_seed(0)
    hidden = 32
    conv = torch.nn.Conv2d(3, hidden, kernel_size=PATCH, stride=PATCH)
    img, rows, _ = make_image(3, 4, 8)
    ref = conv(img[None])[0]  # [hidden, gh, gw]
    ref = ref.flatten(1).T  # [gh·gw, hidden], row-major grid
    w = convert_conv2d_to_linear(conv.weight.detach())
    assert w.shape == (hidden, PATCH * PATCH * 3)
    out = F.linear(rows, w, conv.bias.detach())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_patch_embedding():
    torch.manual_seed(0)
    model = SiglipNaViT(tiny_cfg()).train()
    out = run(model, [make_image(2, 3, 1), make_image(3, 1, 2)])
    out.square().mean().backward()
    emb = model.vision_model.embeddings
    assert emb.patch_embedding.weight.grad is not None and emb.patch_embedding.weight.grad.abs().sum() > 0
    assert emb.position_embedding.weight.grad.abs().sum() > 0


def test_activation_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    base = SiglipNaViT(tiny_cfg()).train()
    ckpt = copy.deepcopy(base)
    ckpt.set_activation_checkpointing(True)
    items = [make_image(2, 3, 1), make_image(3, 3, 2)]
    outs, grads = [], []
    for m in (base, ckpt):
        out = run(m, items)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_input_validation(model):
    img = make_image(2, 2, 1)
    with pytest.raises(ValueError, match="seqlens sum"):
        model(img[1], img[2], torch.tensor([3]))
    with pytest.raises(ValueError, match="packed_position_ids must lie"):
        model(img[1], img[2] + MAX_SIDE**2, torch.tensor([4]))
    with pytest.raises(ValueError, match="packed_pixel_values"):
        model(img[1][:, :-1], img[2], torch.tensor([4]))
    with pytest.raises(ValueError, match="at least one patch"):
        model(img[1], img[2], torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="1-D integer"):
        model(img[1], img[2], torch.tensor([4.0]))
    # Plain Python lengths are accepted too.
    assert model(img[1], img[2], [4]).shape == (4, 32)
    with pytest.raises(ValueError, match="attn_implementation"):
        SiglipNaViT(tiny_cfg(), attn_implementation="bogus")


@pytest.mark.parametrize("backend, expected", [("sdpa", "sdpa"), ("flex", "sdpa"), ("flash", "flash_attention_2")])
def test_the_model_config_attention_backend_reaches_the_vit(monkeypatch, backend, expected):
    """``ModelConfig.attn_backend`` selects SigLIP's attention too (flash-attn itself is not needed to build it)."""
    from helpers import tiny_config

    from unigendet.models import unigendet as unigendet_module
    from unigendet.ops.attention import build_attention

    monkeypatch.setattr(unigendet_module, "build_attention", lambda name: build_attention("sdpa"))
    model = unigendet_module.UniGenDet(tiny_config(attn_backend=backend))
    assert model.vit_model.attn_implementation == expected
    layer_config = model.vit_model.vision_model.encoder.layers[0].self_attn.config
    assert layer_config._attn_implementation == expected
