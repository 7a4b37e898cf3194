"""LitGPT-style parity: with both experts holding identical weights and text-only input, the MoT
stack equals transformers' Qwen2 on the same weights (qk-norm off, as in vanilla Qwen2)."""

import pytest
import torch
from transformers import Qwen2ForCausalLM

from unigendet.models.config import LLMConfig
from unigendet.models.mot import GEN_SUFFIX, MoTLanguageModel, Routing
from unigendet.ops.attention import PackedLayout, SDPAAttention

CFG = LLMConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, qk_norm=False, max_position_embeddings=256)


def _copy_hf_into_mot(hf: Qwen2ForCausalLM, mot: MoTLanguageModel) -> None:
    hf_state = hf.state_dict()
    own = mot.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            src = name.replace(GEN_SUFFIX, "")
            tensor.copy_(hf_state[src])


def _run_mot(mot, ids, sample_lens, gen_index=None):
    L = ids.numel()
    layout = PackedLayout(tuple(sample_lens), tuple(sample_lens), ("causal",) * len(sample_lens))
    pos = torch.cat([torch.arange(n) for n in sample_lens])
    hidden = mot.model.embed_tokens(ids)
    attention = SDPAAttention()
    routing = Routing.from_gen_index(L, gen_index, hidden.device)
    out, _ = mot.model(hidden, pos, routing, attention.prepare(layout, hidden.device))
    return mot.lm_head(out)


@pytest.fixture
def models():
    torch.manual_seed(0)
    hf_cfg = CFG.to_hf()
    hf_cfg._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    for p in hf.parameters():  # avoid all-ones norms so a norm mix-up would show
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    mot = MoTLanguageModel(CFG, SDPAAttention()).eval()
    _copy_hf_into_mot(hf, mot)
    return hf, mot


def test_text_only_matches_transformers_qwen2(models):
    hf, mot = models
    ids = torch.randint(0, 128, (1, 11))
    expected = hf(input_ids=ids).logits[0]
    got = _run_mot(mot, ids[0], [11])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packed_samples_match_separate_transformers_runs(models):
    hf, mot = models
    a, b = torch.randint(0, 128, (7,)), torch.randint(0, 128, (5,))
    got = _run_mot(mot, torch.cat([a, b]), [7, 5])
    torch.testing.assert_close(got[:7], hf(input_ids=a[None]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[7:], hf(input_ids=b[None]).logits[0], atol=1e-5, rtol=1e-5)


def test_routing_to_identical_gen_expert_changes_nothing(models):
    _, mot = models
    ids = torch.randint(0, 128, (9,))
    plain = _run_mot(mot, ids, [9])
    routed = _run_mot(mot, ids, [9], gen_index=torch.tensor([2, 3, 4]))
    torch.testing.assert_close(routed, plain, atol=1e-6, rtol=1e-6)


def test_routing_uses_gen_weights(models):
    _, mot = models
    ids = torch.randint(0, 128, (9,))
    plain = _run_mot(mot, ids, [9])
    with torch.no_grad():
        mot.model.layers[0].mlp_moe_gen.down_proj.weight.mul_(2.0)
    routed = _run_mot(mot, ids, [9], gen_index=torch.tensor([2, 3, 4]))
    # Positions before the first gen token are unaffected (causal); gen positions change.
    torch.testing.assert_close(routed[:2], plain[:2])
    assert not torch.allclose(routed[2], plain[2])


def test_qk_norm_matches_transformers_qwen3():
    """BAGEL's layer = Qwen2 + per-head q/k RMSNorm before RoPE, which is transformers' Qwen3 with
    q/k/v biases (its extra o_proj bias is zeroed, since Qwen2 has none)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = LLMConfig(**{**CFG.__dict__, "qk_norm": True})
    torch.manual_seed(1)
    q3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, attention_bias=True,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attn_implementation="eager",
    )).eval()
    with torch.no_grad():
        for name, p in q3.named_parameters():
            if name.endswith("o_proj.bias"):
                p.zero_()
            elif p.dim() == 1:
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
    mot = MoTLanguageModel(cfg, SDPAAttention()).eval()
    q3_state = q3.state_dict()
    with torch.no_grad():
        for name, tensor in mot.state_dict().items():
            tensor.copy_(q3_state[name.replace(GEN_SUFFIX, "")])
    ids = torch.randint(0, 128, (1, 10))
    torch.testing.assert_close(_run_mot(mot, ids[0], [10]), q3(input_ids=ids).logits[0], atol=1e-5, rtol=1e-5)
