"""Packed attention over a flat token stream holding several samples, each made of splits (BAGEL's
packed-sequence format): the mask rule and three interchangeable backends that compute the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTN_MODES = ("causal", "full", "noise")


@dataclass(frozen=True)
class PackedLayout:
    """Split structure of a packed stream. ``split_lens``/``attn_modes`` run over all splits of all
    samples in order; ``sample_lens`` group consecutive splits into samples.

    A split is a run of tokens with one attention mode:

    - ``causal``: causal inside the split, sees every visible earlier token of its sample;
    - ``full``: bidirectional inside the split, sees every visible earlier token of its sample;
    - ``noise``: like ``full``, but no token outside the split may ever attend to it (images being
      denoised must not leak into later text).
    """

    sample_lens: tuple[int, ...]
    split_lens: tuple[int, ...]
    attn_modes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.split_lens) != len(self.attn_modes):
            raise ValueError(f"{len(self.split_lens)} split_lens but {len(self.attn_modes)} attn_modes")
        bad = sorted({m for m in self.attn_modes if m not in ATTN_MODES})
        if bad:
            raise ValueError(f"unknown attention mode(s) {bad}; expected one of {ATTN_MODES}")
        if any(n <= 0 for n in self.split_lens) or any(n <= 0 for n in self.sample_lens):
            raise ValueError("split and sample lengths must be positive")
        if sum(self.split_lens) != sum(self.sample_lens):
            raise ValueError(f"splits cover {sum(self.split_lens)} tokens but samples {sum(self.sample_lens)}")
        # Every sample boundary must coincide with a split boundary.
        boundaries = set(_cumsum(self.split_lens))
        missing = [b for b in _cumsum(self.sample_lens) if b not in boundaries]
        if missing:
            raise ValueError(f"sample boundaries {missing} fall inside a split")

    @property
    def total_len(self) -> int:
        return sum(self.sample_lens)

    def token_tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token (sample id, split id, mode id) with mode ids indexing ``ATTN_MODES``."""
        split_lens = torch.tensor(self.split_lens, device=device)
        sample_of_split = _sample_of_split(self)
        split_ids = torch.repeat_interleave(torch.arange(len(self.split_lens), device=device), split_lens)
        sample_ids = torch.tensor(sample_of_split, device=device)[split_ids]
        modes = torch.tensor([ATTN_MODES.index(m) for m in self.attn_modes], device=device)[split_ids]
        return sample_ids, split_ids, modes


def _cumsum(values) -> list[int]:
    out, acc = [], 0
    for v in values:
        acc += v
        out.append(acc)
    return out


def _sample_of_split(layout: PackedLayout) -> list[int]:
    ends = _cumsum(layout.sample_lens)
    out, pos, sample = [], 0, 0
    for n in layout.split_lens:
        out.append(sample)
        pos += n
        if pos == ends[sample] and sample + 1 < len(ends):
            sample += 1
    return out


def allowed_mask(sample_ids, split_ids, modes, q_idx, kv_idx):
    """Elementwise mask rule shared by the dense masks and flex's ``mask_mod``.

    For query ``i`` and key ``j`` of the same sample: ``allowed = (j <= i or (split(i) == split(j) and
    mode(i) != causal)) and not (mode(j) == noise and split(j) != split(i))``. Different samples never see
    each other.
    """
    same_sample = sample_ids[q_idx] == sample_ids[kv_idx]
    same_split = split_ids[q_idx] == split_ids[kv_idx]
    causal_id = ATTN_MODES.index("causal")
    noise_id = ATTN_MODES.index("noise")
    visible = (kv_idx <= q_idx) | (same_split & (modes[q_idx] != causal_id))
    hidden_noise = (modes[kv_idx] == noise_id) & ~same_split
    return same_sample & visible & ~hidden_noise


def dense_mask(layout: PackedLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[L, L]`` mask of the whole pack (True = may attend). For tests and small packs."""
    sample_ids, split_ids, modes = layout.token_tensors(device)
    idx = torch.arange(layout.total_len, device=device)
    return allowed_mask(sample_ids, split_ids, modes, idx[:, None], idx[None, :])


# --------------------------------------------------------------------------------------------------
# SDPA: one call per sample with its dense boolean mask (the reference's default training path).


class SDPAAttention:
    name = "sdpa"

    def prepare(self, layout: PackedLayout, device: torch.device) -> list[tuple[int, int, torch.Tensor | None]]:
        sample_ids, split_ids, modes = layout.token_tensors(device)
        out, start = [], 0
        for n in layout.sample_lens:
            idx = torch.arange(start, start + n, device=device)
            mask = allowed_mask(sample_ids, split_ids, modes, idx[:, None], idx[None, :])
            # A purely causal sample (text only) can use the kernel's causal path without a mask.
            is_causal = bool((modes[start : start + n] == 0).all())
            out.append((start, start + n, None if is_causal else mask))
            start += n
        return out

    def __call__(self, q, k, v, prepared, scale: float | None = None) -> torch.Tensor:
        # ``split`` rather than one slice per sample: the backward of a slice zero-fills a gradient the size of the
        # whole pack for every sample and sums them, the backward of a split concatenates once.
        sizes = [end - start for start, end, _ in prepared]
        outs = []
        for qs, ks, vs, (_, _, mask) in zip(q.split(sizes), k.split(sizes), v.split(sizes), prepared):
            qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs))
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
            outs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------------
# flex_attention: one BlockMask for the whole pack; compiled on CUDA, eager elsewhere.


class FlexAttention:
    name = "flex"

    def __init__(self, compile: bool | None = None, block_size: int = 128):
        from torch.nn.attention import flex_attention as flex

        self._flex = flex
        self.block_size = block_size
        self.compile = torch.cuda.is_available() if compile is None else compile
        self._fn = torch.compile(flex.flex_attention, dynamic=False) if self.compile else flex.flex_attention

    def prepare(self, layout: PackedLayout, device: torch.device):
        sample_ids, split_ids, modes = layout.token_tensors(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed_mask(sample_ids, split_ids, modes, q_idx, kv_idx)

        n = layout.total_len
        return self._flex.create_block_mask(
            mask_mod, None, None, n, n, device=str(device), BLOCK_SIZE=self.block_size, _compile=self.compile
        )

    def __call__(self, q, k, v, prepared, scale: float | None = None) -> torch.Tensor:
        import warnings

        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(
                "attn_backend='flex' has no backward pass on CPU in PyTorch; train on CPU with attn_backend='sdpa' "
                "(flex is fine on CPU for inference and on CUDA for training)"
            )
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        with warnings.catch_warnings():
            # Eager flex on CPU warns on every call that it is unfused; that is expected in tests.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            o = self._fn(qs, ks, vs, block_mask=prepared, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# Varlen (flash-attn): each query split becomes one varlen "sequence" whose keys are the visible
# earlier splits of its sample followed by the split itself. Causal splits go through one
# causal call (flash-attn aligns the causal diagonal bottom-right, so the query sees all prefix
# keys plus its own causal prefix), full/noise splits through one non-causal call.


@dataclass
class VarlenGroup:
    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool


def varlen_groups(layout: PackedLayout, device: torch.device) -> list[VarlenGroup]:
    groups: dict[bool, dict[str, list]] = {True: {"q": [], "k": [], "lq": [], "lk": []},
                                           False: {"q": [], "k": [], "lq": [], "lk": []}}
    sample_of_split = _sample_of_split(layout)
    starts = [0] + _cumsum(layout.split_lens)[:-1]
    visible_prefix: list[torch.Tensor] = []
    current_sample = -1
    for s, (start, n, mode) in enumerate(zip(starts, layout.split_lens, layout.attn_modes)):
        if sample_of_split[s] != current_sample:
            current_sample, visible_prefix = sample_of_split[s], []
        own = torch.arange(start, start + n, device=device)
        keys = torch.cat(visible_prefix + [own])
        g = groups[mode == "causal"]
        g["q"].append(own)
        g["k"].append(keys)
        g["lq"].append(n)
        g["lk"].append(len(keys))
        if mode != "noise":
            visible_prefix.append(own)
    out = []
    for causal, g in groups.items():
        if not g["q"]:
            continue
        cu = lambda lens: torch.tensor([0] + _cumsum(lens), dtype=torch.int32, device=device)  # noqa: E731
        out.append(VarlenGroup(torch.cat(g["q"]), torch.cat(g["k"]), cu(g["lq"]), cu(g["lk"]),
                               max(g["lq"]), max(g["lk"]), causal))
    return out


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float | None):
    """Pure-torch stand-in for ``flash_attn_varlen_func`` (bottom-right causal alignment).

    Lets the varlen decomposition be tested on CPU; it is not a fast path."""
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
        mask = None
        if causal:
            nq, nk = qs.shape[-2], ks.shape[-2]
            mask = torch.arange(nk, device=q.device)[None, :] <= (nk - nq + torch.arange(nq, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _flash_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "attn_backend='flash' needs the flash-attn package (pip install 'unigendet[flash]') and a CUDA GPU; "
            "use attn_backend='sdpa' or 'flex' otherwise"
        ) from err

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal)

    return kernel


class VarlenAttention:
    name = "flash"

    def __init__(self, kernel: Callable | None = None):
        self.kernel = kernel if kernel is not None else _flash_kernel()

    def prepare(self, layout: PackedLayout, device: torch.device) -> list[VarlenGroup]:
        return varlen_groups(layout, device)

    def __call__(self, q, k, v, prepared: list[VarlenGroup], scale: float | None = None) -> torch.Tensor:
        out = torch.empty_like(q)
        for g in prepared:
            o = self.kernel(q[g.q_index], k[g.k_index], v[g.k_index], g.cu_q, g.cu_k, g.max_q, g.max_k, g.causal, scale)
            out[g.q_index] = o.to(out.dtype)
        return out


def build_attention(backend: str, **kwargs: Any):
    """Construct the backend named in the model config (imports optional kernels here, not at import).

    ``sdpa`` uses a dense boolean mask per sample, ``flex`` one BlockMask over the pack and ``flash`` flash-attn
    varlen over a split-wise decomposition. Each derives its structure once per batch in ``prepare`` and
    every layer reuses it.
    """
    if backend == "sdpa":
        return SDPAAttention()
    if backend == "flex":
        return FlexAttention(**kwargs)
    if backend == "flash":
        return VarlenAttention(**kwargs)
    raise ValueError(f"unknown attention backend {backend!r}; expected 'sdpa', 'flex' or 'flash'")
