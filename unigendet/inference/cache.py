"""Key/value cache for incremental (cached) inference over a batch of sequences."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Key/value cache of a batch of sequences.

    Layout: per decoder layer one key and one value tensor ``[B, H_kv, C, D]`` (model dtype), a padded
    "static" layout with per-sequence ``lengths`` (cached tokens) and ``rope`` (next RoPE position id).
    ``C`` is the capacity, shared by the batch; it grows geometrically (doubling, zero-filled), so
    appending a block is an in-place write, not a rebuild of the whole cache (the reference's
    ``NaiveCache`` re-scatters everything on every update). The layout is what SDPA reads directly:
    a query block of sequence ``b`` attends to ``keys[b, :, :lengths[b]]`` plus its own keys, which
    :class:`~unigendet.inference.cached_forward.CachedForward` writes into the slots just after ``lengths[b]``.

    Writing a block's keys does not make them part of the context: only ``advance`` (a *commit*) moves
    ``lengths``. A block that is not committed (an image being denoised) leaves scratch values beyond
    ``lengths`` that the next write overwrites; reads never look past ``lengths`` for cached context.
    Unused slots are always finite (zero-filled at allocation, later only overwritten with real keys):
    a masked-out slot gets softmax weight 0, and 0 x NaN would poison the output.

    Sequences are independent rows: ``select`` (reorder, subset, repeat) and ``cat`` build new caches
    (copies) for classifier-free-guidance branches or to drop finished sequences; ``clone`` forks a state.
    """

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        lengths: torch.Tensor,
        rope: torch.Tensor,
    ):
        if len(keys) != len(values) or not keys:
            raise ValueError("need one key and one value tensor per layer")
        batch = keys[0].shape[0]
        if lengths.shape != (batch,) or rope.shape != (batch,):
            raise ValueError(f"lengths/rope must be [{batch}], got {tuple(lengths.shape)} / {tuple(rope.shape)}")
        self.keys = keys
        self.values = values
        # Bookkeeping stays on the CPU (Python decides shapes from it); the cached forward copies it to the device.
        self.lengths = lengths.to("cpu", torch.long)
        self.rope = rope.to("cpu", torch.long)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(
        cls,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 0,
        layer_devices: Sequence[torch.device | str] | None = None,
    ) -> KVCache:
        """``batch_size`` empty sequences (length 0, next RoPE id 0). ``layer_devices`` (one per layer, for a model
        split over devices) puts each layer's keys and values on its layer's device instead of ``device``."""
        if batch_size < 1:
            raise ValueError("a cache needs at least one sequence")
        if layer_devices is None:
            layer_devices = [device] * num_layers
        if len(layer_devices) != num_layers:
            raise ValueError(f"{len(layer_devices)} layer devices for {num_layers} layers")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        values = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        zeros = torch.zeros(batch_size, dtype=torch.long)
        return cls(keys, values, zeros, zeros.clone())

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the first layer's entries (a split model's cache has each layer's on its layer's device)."""
        return self.keys[0].device

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch_size}, layers={self.num_layers}, capacity={self.capacity}, "
                f"lengths={self.lengths.tolist()}, rope={self.rope.tolist()})")

    # ------------------------------------------------------------------ growth and writes
    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` slots per sequence; grows to ``max(needed, 2 * capacity)``."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                b, h, c, d = old.shape
                grown = old.new_zeros((b, h, new_cap, d))
                grown[:, :, :c] = old
                store[i] = grown

    def write(self, layer: int, seq_ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [N, H_kv, D]`` at slot ``positions[n]`` of sequence ``seq_ids[n]`` (no commit)."""
        self.keys[layer][seq_ids, :, positions] = k.to(self.dtype)
        self.values[layer][seq_ids, :, positions] = v.to(self.dtype)

    def advance(self, num_tokens: Sequence[int] | torch.Tensor, next_rope: Sequence[int] | torch.Tensor) -> None:
        """Commit: the slots just written become context; ``next_rope`` is each sequence's new RoPE id."""
        num_tokens = torch.as_tensor(num_tokens, dtype=torch.long).cpu()
        next_rope = torch.as_tensor(next_rope, dtype=torch.long).cpu()
        if int((self.lengths + num_tokens).max()) > self.capacity:
            raise ValueError("advance past the written slots (write before committing)")
        self.lengths = self.lengths + num_tokens
        self.rope = next_rope.clone()

    # ------------------------------------------------------------------ forks
    def clone(self) -> KVCache:
        """An independent copy of this state (for a branch that will diverge)."""
        return KVCache([k.clone() for k in self.keys], [v.clone() for v in self.values],
                       self.lengths.clone(), self.rope.clone())

    fork = clone

    def select(self, index: Sequence[int] | torch.Tensor) -> KVCache:
        """A new cache with the rows ``index`` (any order, repeats allowed), trimmed to their longest length."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError("select needs at least one sequence")
        lengths = self.lengths[idx]
        keep = int(lengths.max())
        keys = [k[idx.to(k.device), :, :keep].clone() for k in self.keys]
        values = [v[idx.to(v.device), :, :keep].clone() for v in self.values]
        return KVCache(keys, values, lengths.clone(), self.rope[idx].clone())

    @classmethod
    def cat(cls, caches: Sequence[KVCache]) -> KVCache:
        """Stack the sequences of several caches (same layers, heads, dtype, device) into one batch."""
        if not caches:
            raise ValueError("cat needs at least one cache")
        first = caches[0]
        for c in caches[1:]:
            if (c.num_layers, c.keys[0].shape[1], c.keys[0].shape[3], c.dtype, c.device) != (
                first.num_layers, first.keys[0].shape[1], first.keys[0].shape[3], first.dtype, first.device
            ):
                raise ValueError("caches to concatenate differ in geometry, dtype or device")
        cap = max(int(c.lengths.max()) for c in caches)
        keys, values = [], []
        for layer in range(first.num_layers):
            keys.append(torch.cat([_fit(c.keys[layer], cap) for c in caches]))
            values.append(torch.cat([_fit(c.values[layer], cap) for c in caches]))
        return cls(keys, values, torch.cat([c.lengths for c in caches]), torch.cat([c.rope for c in caches]))

    # ------------------------------------------------------------------ inspection
    def sequence(self, b: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values ``[H_kv, len_b, D]`` of sequence ``b`` at ``layer`` (views)."""
        n = int(self.lengths[b])
        return self.keys[layer][b, :, :n], self.values[layer][b, :, :n]


def _fit(t: torch.Tensor, cap: int) -> torch.Tensor:
    """``t [B, H, C, D]`` trimmed or zero-padded to ``cap`` slots."""
    c = t.shape[2]
    if c >= cap:
        return t[:, :, :cap]
    out = t.new_zeros((t.shape[0], t.shape[1], cap, t.shape[3]))
    out[:, :, :c] = t
    return out
