"""Cached forward passes of a ``UniGenDet`` over a batch of sequences, one KV cache per sequence as in
BAGEL's inference.

Inference is a series of *query blocks*, one per sequence of a batch, each run against that
sequence's KV cache (:class:`~unigendet.inference.cache.KVCache`) plus itself:

=======================  ===========================  ==========  ========================================
block                    tokens                       commit      RoPE
=======================  ===========================  ==========  ========================================
text prefill             ``<|im_start|> ids <|im_end|>``  yes      one id per token from ``cache.rope``
ViT / clean VAE image    markers + patches/latents    yes         all at ``cache.rope``, then +1
several items at once    any of the above, in order   yes         as the packer lays them out
decoding step            one token                    yes         ``cache.rope``, then +1
image being denoised     markers + noised latents     **no**      all at ``cache.rope``, unchanged
=======================  ===========================  ==========  ========================================

A block is laid out by the training packer (:class:`~unigendet.data.packing.PackBuilder`, one sample
per sequence) and embedded by the model's own ``embed`` (token embedding, SigLIP + connector + ViT
position table, ``vae2llm`` + time embedding + latent position table), so inference inputs are the
training inputs by construction. Routing is the training routing: latent tokens go to the gen
expert, every other token (text, markers, ViT patches) to the und expert. Inside a block the
attention rule is the training mask (``unigendet.ops.attention.allowed_mask``: causal text, full
image splits, noise splits invisible to other splits); every cached token of the same sequence is
visible, which is the bottom-right-aligned causal rule of the reference's flash-attn varlen calls.

Attention runs as one SDPA call per layer over the padded batch ``[B, heads, n_max, T]`` with a
boolean mask (dropped when it is all true), keys read in place from the cache.

A model split over several devices (:mod:`unigendet.inference.device_map`) runs the same way: blocks are
embedded on the input device, each layer's KV cache lives on that layer's device, the attention plan's index
tensors and mask are copied once per device and forward, and the heads return their outputs on the input device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unigendet.data.packing import PackBuilder, PackedBatch, PlanItem
from unigendet.data.tokenizer import SpecialTokenIds
from unigendet.inference.cache import KVCache
from unigendet.models.config import pack_geometry
from unigendet.models.mot import Routing
from unigendet.ops.attention import PackedLayout, allowed_mask


@dataclass
class Block:
    """A query block: ``lengths[b]`` tokens for sequence ``b`` of a cache batch, packed sequence-major."""

    hidden: torch.Tensor  # [N, D] input embeddings
    lengths: tuple[int, ...]  # tokens per sequence
    position_ids: torch.Tensor  # Long [N] RoPE ids relative to each sequence's cache.rope
    layout: PackedLayout  # split structure (sample_lens == lengths)
    gen_index: torch.Tensor | None = None  # Long [M]: packed positions of latent tokens (gen expert)

    def __post_init__(self) -> None:
        if tuple(self.layout.sample_lens) != tuple(self.lengths):
            raise ValueError(f"layout sample lengths {self.layout.sample_lens} != block lengths {self.lengths}")
        if sum(self.lengths) != self.hidden.shape[0] or self.position_ids.shape != (self.hidden.shape[0],):
            raise ValueError("hidden / position_ids do not match the block lengths")
        if any(n < 1 for n in self.lengths):
            raise ValueError("every sequence of a block needs at least one token")

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def has_noise(self) -> bool:
        return "noise" in self.layout.attn_modes

    def tile(self, times: int) -> Block:
        """The same block repeated for ``times`` groups of sequences (CFG branches share one
        embedding; each branch's RoPE offset comes from its own cache)."""
        if times == 1:
            return self
        n = self.num_tokens
        gen = None
        if self.gen_index is not None:
            gen = torch.cat([self.gen_index + r * n for r in range(times)])
        layout = PackedLayout(self.layout.sample_lens * times, self.layout.split_lens * times,
                              self.layout.attn_modes * times)
        return Block(self.hidden.repeat(times, 1), self.lengths * times, self.position_ids.repeat(times), layout, gen)


@dataclass
class CachedForwardStats:
    """Work done by a :class:`CachedForward`: forward calls, sequences and tokens processed (for tests and logs)."""

    forward_calls: int = 0
    sequences: int = 0
    tokens: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)  # (sequences, tokens) per call

    def record(self, sequences: int, tokens: int) -> None:
        self.forward_calls += 1
        self.sequences += sequences
        self.tokens += tokens
        self.history.append((sequences, tokens))


class CachedForward:
    """Cached forward passes for one model. Owns nothing but the model reference, the packer and stats."""

    def __init__(self, model, special: SpecialTokenIds):
        self.model = model
        self.special = special
        self.config = model.config
        self.builder = PackBuilder(special, pack_geometry(model.config))
        self.stats = CachedForwardStats()

    @property
    def device(self) -> torch.device:
        return self.model.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.model.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, capacity: int = 0) -> KVCache:
        llm = self.config.llm
        return KVCache.empty(llm.num_hidden_layers, batch_size, llm.num_key_value_heads, llm.head_dim,
                             self.dtype, self.device, capacity, self.model.language_model.model.layer_devices)

    # ------------------------------------------------------------------ blocks
    def pack(self, plans: list[list[PlanItem]]) -> PackedBatch:
        """Lay out one sample per sequence with the training packer (no CFG dropout)."""
        return self.builder.build(plans, ["inference"] * len(plans)).to(self.device)

    @torch.no_grad()
    def embed(self, batch: PackedBatch, latent_tokens: torch.Tensor | None = None,
              latent_timesteps: torch.Tensor | None = None) -> Block:
        """Embed a packed batch (one sample per sequence) with the model's ``embed``."""
        hidden = self.model.embed(batch, latent_tokens, latent_timesteps)
        gen = batch.vae_token_indexes if batch.vae_token_indexes.numel() else None
        return Block(hidden, tuple(batch.sample_lens), batch.position_ids, batch.layout, gen)

    @torch.no_grad()
    def token_block(self, token_ids: torch.Tensor) -> Block:
        """One text token per sequence (a decoding step): causal, und expert, RoPE ``cache.rope``."""
        ids = token_ids.to(self.device).reshape(-1)
        b = ids.numel()
        hidden = self.model.language_model.model.embed_tokens(ids)
        layout = PackedLayout((1,) * b, (1,) * b, ("causal",) * b)
        return Block(hidden, (1,) * b, torch.zeros(b, dtype=torch.long, device=self.device), layout)

    # ------------------------------------------------------------------ the cached forward
    @torch.no_grad()
    def forward(self, cache: KVCache, block: Block, commit: bool) -> torch.Tensor:
        """Run ``block`` against ``cache``; returns the final-normed states ``[N, D]`` (on the device of the final
        norms: the last device of a split model; the head methods below accept them there).

        ``commit=True`` adds the block to the context (lengths grow, RoPE moves past the block's
        largest id); ``commit=False`` leaves the cache's context unchanged (image being denoised)."""
        if block.batch_size != cache.batch_size:
            raise ValueError(f"block has {block.batch_size} sequences, cache {cache.batch_size}")
        if commit and block.has_noise:
            raise ValueError("a block with noise splits (an image being denoised) must not be committed")
        device = self.device
        plan = _AttentionPlan.build(cache, block, device)
        cache.reserve(plan.total)
        positions = block.position_ids.to(device) + cache.rope.to(device)[plan.seq_ids]
        routing = Routing.from_gen_index(block.num_tokens, block.gen_index, device)

        def attend(layer: int, q, k, v, scale):
            return plan.attend(cache, layer, q, k, v, scale)

        hidden = self.model.forward_cached(block.hidden, positions, routing, attend)
        self.stats.record(block.batch_size, block.num_tokens)
        if commit:
            last_rel = torch.zeros(block.batch_size, dtype=torch.long, device=device)
            last_rel = last_rel.scatter_reduce(0, plan.seq_ids, block.position_ids.to(device), "amax", include_self=True)
            cache.advance(block.lengths, cache.rope + last_rel.cpu() + 1)
        return hidden

    # ------------------------------------------------------------------ heads
    # Each head takes ``hidden`` to its own device and returns on the input device (``self.device``), where the
    # callers keep their tensors; on a model on one device both moves are no-ops.
    def _head(self, head, hidden: torch.Tensor) -> torch.Tensor:
        return head(hidden.to(next(head.parameters()).device)).to(self.device)

    @torch.no_grad()
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(self.model.language_model.lm_head, hidden)

    @torch.no_grad()
    def detection_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(self.model.detection_head, hidden)

    @torch.no_grad()
    def velocity(self, hidden: torch.Tensor, block: Block) -> torch.Tensor:
        """``llm2vae`` at the block's latent tokens (packed order) -> ``[M, patch_latent_dim]``."""
        return self._head(self.model.llm2vae, hidden[block.gen_index.to(hidden.device)])

    @staticmethod
    def last_token_index(block: Block) -> torch.Tensor:
        """Packed position of every sequence's last token ``[B]``."""
        ends = torch.tensor(block.lengths, device=block.hidden.device).cumsum(0)
        return ends - 1


@dataclass
class _AttentionPlan:
    """Index tensors and the mask of one block against one cache, shared by every layer."""

    seq_ids: torch.Tensor  # [N] sequence of each packed token
    offsets: torch.Tensor  # [N] index of the token inside its sequence's block
    write_pos: torch.Tensor  # [N] cache slot of the token's key/value (lengths[b] + offset)
    batch: int
    n_max: int
    total: int  # key slots read: max(lengths[b] + block length[b])
    mask: torch.Tensor | None  # Bool [B, 1, n_max, total], None when everything is visible
    # Copies of the index tensors and the mask on the other devices of a split model, made at first use.
    copies: dict[torch.device, _AttentionPlan] = field(default_factory=dict, repr=False)
    additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)  # see ``additive_mask``

    @classmethod
    def build(cls, cache: KVCache, block: Block, device: torch.device) -> _AttentionPlan:
        b = block.batch_size
        n = torch.tensor(block.lengths, dtype=torch.long, device=device)
        past = cache.lengths.to(device)
        starts = n.cumsum(0) - n
        seq_ids = torch.repeat_interleave(torch.arange(b, device=device), n)
        offsets = torch.arange(block.num_tokens, device=device) - starts[seq_ids]
        n_max = max(block.lengths)
        total = int((cache.lengths + torch.tensor(block.lengths)).max())

        # Key slot j of sequence s: cached context if j < past[s], this block's token j - past[s] if
        # that lies inside the block, otherwise unused.
        j = torch.arange(total, device=device)
        jj = j[None, :] - past[:, None]  # [B, T]
        in_cache = jj < 0
        in_block = (jj >= 0) & (jj < n[:, None])
        i = torch.arange(n_max, device=device)
        valid_q = i[None, :] < n[:, None]  # [B, n_max]
        # Inside the block: the training mask rule on packed indexes (clamped where invalid, then gated).
        q_packed = starts[:, None] + torch.minimum(i[None, :], n[:, None] - 1)
        k_packed = starts[:, None] + jj.clamp(min=0).minimum(n[:, None] - 1)
        sample_ids, split_ids, modes = block.layout.token_tensors(device)
        inner = allowed_mask(sample_ids, split_ids, modes, q_packed[:, :, None], k_packed[:, None, :])
        mask = in_cache[:, None, :] | (in_block[:, None, :] & inner)
        # Padding query rows (shorter blocks) see every slot: finite garbage, discarded afterwards.
        mask = mask | ~valid_q[:, :, None]
        mask = None if bool(mask.all()) else mask[:, None]
        write_pos = past[seq_ids] + offsets
        return cls(seq_ids, offsets, write_pos, b, n_max, total, mask)

    def on(self, device: torch.device) -> _AttentionPlan:
        """This plan with its tensors on ``device`` (itself when they are there already)."""
        if self.seq_ids.device == device:
            return self
        if device not in self.copies:
            mask = None if self.mask is None else self.mask.to(device)
            self.copies[device] = _AttentionPlan(self.seq_ids.to(device), self.offsets.to(device),
                                                 self.write_pos.to(device), self.batch, self.n_max, self.total, mask)
        return self.copies[device]

    def attend(self, cache: KVCache, layer: int, q, k, v, scale) -> torch.Tensor:
        """q ``[N, H, D]``, k/v ``[N, H_kv, D]`` of the block -> attention output ``[N, H, D]``, computed on the
        device of ``q`` (the layer's) with the index tensors and mask copied there once per device."""
        if q.device != self.seq_ids.device:
            return self.on(q.device).attend(cache, layer, q, k, v, scale)
        cache.write(layer, self.seq_ids, self.write_pos, k, v)
        heads, dim = q.shape[1], q.shape[2]
        qp = q.new_zeros((self.batch, self.n_max, heads, dim))
        qp[self.seq_ids, self.offsets] = q
        keys = cache.keys[layer][:, :, : self.total]
        values = cache.values[layer][:, :, : self.total]
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                           attn_mask=self.additive_mask(q.dtype), scale=scale, enable_gqa=True)
        return o.transpose(1, 2)[self.seq_ids, self.offsets]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as 0 / -inf in ``dtype``, made once per plan and dtype: SDPA converts a boolean mask to this
        form on every call, which was once per layer."""
        if self.mask is None:
            return None
        if dtype not in self.additive:
            self.additive[dtype] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill(
                ~self.mask, float("-inf"))
        return self.additive[dtype]


__all__ = ["Block", "CachedForwardStats", "CachedForward"]
