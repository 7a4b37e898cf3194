"""Exponential moving average of the trainable weights, sharded across ranks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from unigendet.config.ranges import require_range
from unigendet.distributed import is_main_process, rank, world_size

logger = logging.getLogger(__name__)


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.99

    def validate(self) -> None:
        require_range("decay", self.decay, 0, 1, low_open=True, high_open=True)


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Greedy balance: biggest tensors first, each to the least-loaded rank."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=load.__getitem__)
        owners[i] = r
        load[r] += sizes[i]
    return owners


class ShardedEMA:
    """fp32 averages of this rank's share of the trainable weights: ``update`` after each optimiser step,
    ``save``/``load`` per rank, ``consolidated`` for export.

    The reference deep-copies the whole model on every rank before sharding (host-RAM blowups at 7B).
    Here each rank keeps fp32 averages of only its share:

    * ZeRO-0/1/2 (parameters replicated): every trainable parameter has one owner rank, assigned
      greedily by size; only the owner keeps and updates its average.
    * ZeRO-3 (parameters partitioned): each rank averages its own partition (``param.ds_tensor``).

    So the EMA costs ``4 bytes x trainable parameters / world_size`` per rank. It is saved per rank
    next to DeepSpeed's files and consolidated on rank 0 only when exported. Under bf16 the averaged
    values are the bf16 model weights (not DeepSpeed's fp32 master copy), accumulated in fp32.
    """

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int):
        self.decay = decay
        self.zero3 = zero_stage == 3
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.params = [params[n] for n in self.names]
        if self.zero3:
            self.owned = list(range(len(self.params)))
        else:
            owners = assign_owners([p.numel() for p in self.params], world_size())
            self.owned = [i for i, r in enumerate(owners) if r == rank()]
            self.owners = owners
        self.shadow = {i: self._source(i).detach().float().clone() for i in self.owned}
        n = sum(t.numel() for t in self.shadow.values())
        logger.info("EMA (decay %.4g): %.2fM values on this rank", decay, n / 1e6)

    def _source(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        for i, avg in self.shadow.items():
            avg.mul_(self.decay).add_(self._source(i).float(), alpha=1.0 - self.decay)

    # ---- checkpoints: one safetensors file per rank, written next to DeepSpeed's

    def _shard_path(self, directory: Path) -> Path:
        return directory / f"ema_rank{rank():05d}.safetensors"

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({self.names[i]: t.cpu() for i, t in self.shadow.items()}, str(self._shard_path(directory)))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        path = self._shard_path(directory)
        if not path.is_file():
            raise FileNotFoundError(f"EMA is enabled but {path} is missing (was the checkpoint written without EMA?)")
        saved = load_file(str(path))
        for i in self.owned:
            self.shadow[i].copy_(saved[self.names[i]])

    # ---- export

    @torch.no_grad()
    def consolidated(self) -> dict[str, torch.Tensor]:
        """Full EMA weights on rank 0 (empty dict elsewhere), gathered one tensor at a time."""
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            full = self._gather_zero3(i) if self.zero3 else self._from_owner(i)
            if is_main_process():
                out[name] = full.cpu()
        return out

    def _from_owner(self, i: int) -> torch.Tensor:
        owner = self.owners[i]
        if world_size() == 1:
            return self.shadow[i]
        t = self.shadow[i] if rank() == owner else torch.empty(self.params[i].shape, dtype=torch.float32,
                                                                device=self.params[i].device)
        dist.broadcast(t, src=owner)
        return t

    def _gather_zero3(self, i: int) -> torch.Tensor:
        p = self.params[i]
        local = self.shadow[i]
        parts = [torch.empty_like(local) for _ in range(world_size())]
        if world_size() == 1:
            parts = [local]
        else:
            dist.all_gather(parts, local)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


def build_ema(cfg: EMAConfig, module: torch.nn.Module, zero_stage: int) -> ShardedEMA | None:
    """The EMA of ``module``'s trainable weights (the engine's module, so ZeRO-3 partitions exist), or None."""
    return ShardedEMA(module, cfg.decay, zero_stage) if cfg.enabled else None
