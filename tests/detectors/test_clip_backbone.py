"""The frozen CLIP wrapper: manual layer loop, one-way extra tokens, loading real layouts (HF and OpenAI)."""

from __future__ import annotations

import pytest
import torch
from detector_data import TINY_BACKBONE, hf_to_openai_visual
from safetensors.torch import load_file, save_file
from torch import nn

from unigendet.config.loader import ConfigError, from_dict
from unigendet.detectors.clip_backbone import CLIPBackboneConfig, FrozenCLIP, openai_visual_to_hf


def tiny_backbone(**overrides) -> FrozenCLIP:
    return FrozenCLIP.build(from_dict(CLIPBackboneConfig, {**TINY_BACKBONE, **overrides}))


def one_way_mask(n_context: int, n_extra: int, batch: int) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: context rows may not attend to the extra columns."""
    total = n_context + n_extra
    mask = torch.zeros(batch, 1, total, total)
    mask[:, :, :n_context, n_context:] = float("-inf")
    return mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_manual_layer_loop_reproduces_output_hidden_states(attn):
    backbone = tiny_backbone(attn_implementation=attn)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = backbone.vision(pixel_values=x, output_hidden_states=True).hidden_states
        manual = backbone.hidden_states(x)
    assert len(manual) == len(reference) == 13
    for ours, theirs in zip(manual, reference):
        assert torch.equal(ours, theirs)


def test_one_way_attention_leaves_clip_tokens_unchanged_and_matches_the_fast_path():
    backbone = tiny_backbone()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        vanilla = backbone.hidden_states(x)
        extra = torch.randn(2, 3, 64, generator=gen)
        n_ctx = vanilla[0].shape[1]
        seq, fast = torch.cat([vanilla[0], extra], dim=1), extra
        mask = one_way_mask(n_ctx, 3, 2)
        worst = 0.0
        for layer in range(1, backbone.num_layers + 1):
            seq = backbone.layer(layer, seq, mask)
            fast = backbone.extra_token_step(layer, vanilla[layer - 1], fast)
            worst = max(worst, (seq[:, :n_ctx] - vanilla[layer]).abs().max().item())
            torch.testing.assert_close(seq[:, n_ctx:], fast, atol=1e-5, rtol=1e-5)
        # Masked-out keys get probability exp(-inf) = 0; only summation order differs.
        assert worst < 1e-5
        # Without the mask the CLIP tokens do change: the mask is what keeps them.
        joint = backbone.layer(1, torch.cat([vanilla[0], extra], dim=1))
        assert (joint[:, :n_ctx] - vanilla[1]).abs().max() > 1e-4


def test_backbone_is_frozen_and_stays_in_eval_mode():
    backbone = tiny_backbone()
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.vision.training


def test_cls_attention_is_a_distribution_over_patches_minus_self():
    backbone = tiny_backbone()
    with torch.no_grad():
        states = backbone.hidden_states(torch.randn(2, 3, 32, 32))
        attention = backbone.cls_attention(6, states[5])
    assert attention.shape == (2, 64)
    assert (attention >= 0).all() and (attention.sum(-1) < 1).all()


def _write_full_clip_dir(tmp_path, seed: int = 0):
    """A tiny openai/clip-vit-large-patch14-layout directory (full CLIPModel: text + vision + projections)."""
    from transformers import CLIPConfig, CLIPModel

    vision = {k: v for k, v in TINY_BACKBONE.items() if k != "attn_implementation"}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(tmp_path)
    return model


def test_loads_a_real_layout_clip_directory(tmp_path):
    model = _write_full_clip_dir(tmp_path)
    config = from_dict(CLIPBackboneConfig, {"path": str(tmp_path), "hidden_size": 1024})
    backbone = FrozenCLIP.build(config, with_projection=True)
    assert config.hidden_size == 64 and config.num_hidden_layers == 12  # geometry adopted from the directory
    ours, theirs = backbone.vision.encoder.layers[7], model.vision_model.encoder.layers[7]
    assert torch.equal(ours.mlp.fc1.weight, theirs.mlp.fc1.weight)
    assert torch.equal(backbone.projection.weight, model.visual_projection.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=x)
        expected = getattr(expected, "pooler_output", expected)
        ours = backbone.project(backbone.post_layernorm(backbone.hidden_states(x)[-1][:, 0]))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_a_directory_with_missing_vision_weights_is_an_error(tmp_path):
    _write_full_clip_dir(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["vision_model.encoder.layers.3.mlp.fc1.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="encoder.layers.3.mlp.fc1.weight"):
        FrozenCLIP.build(from_dict(CLIPBackboneConfig, {"path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="no config.json"):
        FrozenCLIP.build(from_dict(CLIPBackboneConfig, {"path": str(tmp_path / "nowhere")}))


class _OpenAIBlock(nn.Module):
    """OpenAI CLIP's residual attention block (sequence-first, QuickGELU), for checking the conversion."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str, heads: int):
        super().__init__()
        hidden, width = state[prefix + "mlp.c_fc.weight"].shape
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_fc, self.c_proj = nn.Linear(width, hidden), nn.Linear(hidden, width)
        own = {"attn.in_proj_weight": "attn.in_proj_weight", "attn.in_proj_bias": "attn.in_proj_bias",
               "attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
               "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "ln_2.weight": "ln_2.weight",
               "ln_2.bias": "ln_2.bias", "c_fc.weight": "mlp.c_fc.weight", "c_fc.bias": "mlp.c_fc.bias",
               "c_proj.weight": "mlp.c_proj.weight", "c_proj.bias": "mlp.c_proj.bias"}
        self.load_state_dict({k: state[prefix + v] for k, v in own.items()})

    def forward(self, x):
        x = x + self.attn(*(self.ln_1(x),) * 3, need_weights=False)[0]
        h = self.c_fc(self.ln_2(x))
        return x + self.c_proj(h * torch.sigmoid(1.702 * h))


def test_openai_layout_conversion_matches_an_openai_style_forward():
    backbone = tiny_backbone()
    state = hf_to_openai_visual(backbone)
    converted, projection = openai_visual_to_hf(state)
    assert set(converted) == set(backbone.vision.state_dict())
    assert torch.equal(projection, state["visual.proj"].t())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hf = backbone.hidden_states(x)
        seq = hf[0].permute(1, 0, 2)  # NLD -> LND, as OpenAI's transformer runs
        for i in range(backbone.num_layers):
            seq = _OpenAIBlock(state, f"visual.transformer.resblocks.{i}.", heads=4)(seq)
            torch.testing.assert_close(seq[0], hf[i + 1][:, 0], atol=1e-5, rtol=1e-5)


def test_openai_conversion_names_missing_and_unexpected_keys():
    state = hf_to_openai_visual(tiny_backbone())
    broken = dict(state)
    del broken["visual.transformer.resblocks.2.ln_2.bias"]
    with pytest.raises(ValueError, match=r"missing .*resblocks\.2\.ln_2\.bias"):
        openai_visual_to_hf(broken)
    with pytest.raises(ValueError, match=r"unexpected keys \['visual\.extra'\]"):
        openai_visual_to_hf({**state, "visual.extra": torch.zeros(1)})
