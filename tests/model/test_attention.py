"""Mask semantics of packed attention and agreement of every backend."""

import pytest
import torch
import torch.nn.functional as F

from unigendet.ops.attention import (
    FlexAttention,
    PackedLayout,
    SDPAAttention,
    VarlenAttention,
    build_attention,
    dense_mask,
    reference_varlen_kernel,
)

# Sample 0: text(3, causal) | clean image(4, full) | noised image(3, noise) | text(2, causal)
# Sample 1: text(2, causal) | noised image(3, noise)
LAYOUT = PackedLayout(
    sample_lens=(12, 5),
    split_lens=(3, 4, 3, 2, 2, 3),
    attn_modes=("causal", "full", "noise", "causal", "causal", "noise"),
)


def test_mask_rules():
    m = dense_mask(LAYOUT)
    # Text is causal inside its split.
    assert m[1, 0] and not m[0, 1] and not m[1, 2]
    # A full image block is bidirectional and sees earlier text.
    assert m[3, 6] and m[6, 3] and m[3, 0] and m[3, 2]
    # ... but not later tokens outside the block.
    assert not m[6, 7]
    # A noise block is bidirectional inside, sees earlier clean tokens ...
    assert m[7, 9] and m[9, 7] and m[8, 0] and m[8, 5]
    # ... and no token outside it ever sees it.
    assert not m[10, 7] and not m[11, 9] and not m[11, 8]
    # Later text still sees the earlier clean image.
    assert m[11, 4] and m[10, 0]
    # No attention across samples.
    assert not m[12:, :12].any() and not m[:12, 12:].any()
    # Every token sees itself, so no row is empty.
    assert m.diagonal().all()


def test_noise_followed_by_noise_invisible():
    layout = PackedLayout((6,), (2, 2, 2), ("causal", "noise", "noise"))
    m = dense_mask(layout)
    assert not m[4:, 2:4].any() and m[4:, :2].all() and m[4:, 4:].all()


@pytest.mark.parametrize("bad", [
    dict(sample_lens=(5,), split_lens=(3, 3), attn_modes=("causal", "full")),
    dict(sample_lens=(2, 4), split_lens=(3, 3), attn_modes=("causal", "full")),
    dict(sample_lens=(6,), split_lens=(3, 3), attn_modes=("causal", "diagonal")),
    dict(sample_lens=(6,), split_lens=(3, 3), attn_modes=("causal",)),
])
def test_layout_validation(bad):
    with pytest.raises(ValueError):
        PackedLayout(**bad)


def _reference(q, k, v, layout):
    mask = dense_mask(layout)
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def _qkv(L, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(L, 4, 8, generator=g, requires_grad=requires_grad)
    k = torch.randn(L, 2, 8, generator=g, requires_grad=requires_grad)
    v = torch.randn(L, 2, 8, generator=g, requires_grad=requires_grad)
    return q, k, v


BACKENDS = {
    "sdpa": SDPAAttention,
    "flex": lambda: FlexAttention(compile=False),
    "varlen": lambda: VarlenAttention(kernel=reference_varlen_kernel),
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_forward_matches_dense_reference(name):
    backend = BACKENDS[name]()
    q, k, v = _qkv(LAYOUT.total_len)
    out = backend(q, k, v, backend.prepare(LAYOUT, torch.device("cpu")))
    torch.testing.assert_close(out, _reference(q, k, v, LAYOUT), atol=1e-5, rtol=1e-5)


def test_flex_refuses_cpu_backward_clearly():
    backend = FlexAttention(compile=False)
    q, k, v = _qkv(LAYOUT.total_len, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        backend(q, k, v, backend.prepare(LAYOUT, torch.device("cpu")))


# flex has no CPU backward in PyTorch, so its gradients can only be compared on a CUDA machine.
@pytest.mark.parametrize("name", ["sdpa", "varlen"])
def test_backend_gradients_match_dense_reference(name):
    backend = BACKENDS[name]()
    q, k, v = _qkv(LAYOUT.total_len, requires_grad=True)
    out = backend(q, k, v, backend.prepare(LAYOUT, torch.device("cpu")))
    ref = _reference(q, k, v, LAYOUT)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_varlen_decomposition_has_two_groups():
    groups = VarlenAttention(kernel=reference_varlen_kernel).prepare(LAYOUT, torch.device("cpu"))
    by_causal = {g.causal: g for g in groups}
    # Causal splits: 3 + 2 + 2 query tokens; the last text of sample 0 sees text + clean image + itself.
    assert by_causal[True].q_index.numel() == 7
    assert (by_causal[True].cu_k[1:] - by_causal[True].cu_k[:-1]).tolist() == [3, 3 + 4 + 2, 2]


def test_build_attention_rejects_unknown():
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_attention("eager")
