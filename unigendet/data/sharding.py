"""Infinite, resumable, exactly-sharded iteration over one source: every (rank, DataLoader worker) pair reads
its own slice of each epoch's permutation, so the shards cover every epoch with no duplicates and no gaps.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from unigendet.data.encoding import SampleSource
from unigendet.data.packing import PlanSample
from unigendet.data.quality import BadSample, BadSampleCounter, DataQualityError

logger = logging.getLogger(__name__)

# Bad records are logged at WARNING only for the first few of each reason; the rest go to DEBUG (the
# counter's summary reports totals), so a dataset with many broken files does not flood the log.
_WARN_PER_REASON = 5


def worker_shard_info() -> tuple[int, int]:
    """``(worker_id, num_workers)`` of the calling DataLoader worker; ``(0, 1)`` in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (int(info.id), int(info.num_workers))


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for ``(seed, epoch)``, stable across processes, machines and Python versions
    (unlike ``hash()``, which is salted for strings and version-dependent for tuples)."""
    digest = hashlib.sha256(f"unigendet-epoch:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_records: int, seed: int, epoch: int) -> torch.Tensor:
    """The record order of epoch ``epoch``: identical on every rank and worker."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_records, generator=generator)


def shard_size(num_records: int, shard: int, num_shards: int) -> int:
    """How many of the epoch's ``num_records`` positions ``shard`` owns (``shard, shard + G, ...``)."""
    return len(range(shard, num_records, num_shards))


class ShardedStream:
    """Iterator of ``PlanSample``s of one shard of ``source``, forever.

    ``worker_id``/``num_workers`` default to the calling DataLoader worker's (resolved at the first
    ``next``, because the stream is usually built in the main process and copied into the workers).

    Every (rank, DataLoader worker) pair is one *shard*: ``g = rank * num_workers + worker_id`` of
    ``G = world_size * num_workers``. Epoch ``e`` visits the records in the order of a permutation that depends
    only on ``(seed, e)`` -- so all shards agree on it without communicating -- and shard ``g`` takes the
    permutation positions ``g, g + G, g + 2G, ...``. The shards therefore partition every epoch: each record
    is visited exactly once per epoch, with no duplicates and no gaps. When ``N`` is not a multiple of ``G`` the
    first ``N mod G`` shards take one record more; that is harmless because every shard loops forever and
    ranks pack independently (no shard waits for another at an epoch boundary). Each epoch uses a new
    permutation (the reference reuses one order for every epoch).

    Bad records (:class:`~unigendet.data.quality.BadSample`) are skipped and counted in ``stream.counter``;
    the stream raises :class:`~unigendet.data.quality.DataQualityError` only when the bad fraction exceeds
    ``max_bad_fraction`` after ``min_seen`` records, or when a whole epoch of this shard yields nothing.

    Resuming: ``state_dict()`` names the next record (epoch, cursor in this shard's slice of that epoch) and
    carries the counter. A stream restored with ``load_state_dict`` yields exactly what the uninterrupted
    stream would have. Inside DataLoader workers the iterating object is the worker's copy, so the packer
    must send that copy's ``state_dict()`` back with its output for checkpointing.
    """

    def __init__(
        self,
        source: SampleSource,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int | None = None,
        num_workers: int | None = None,
        max_bad_fraction: float = 0.05,
        min_seen: int = 500,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if (worker_id is None) != (num_workers is None):
            raise ValueError("give both worker_id and num_workers, or neither (then the DataLoader's are used)")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.source = source
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self._worker = None if worker_id is None else (int(worker_id), int(num_workers))
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.num_records = len(source)
        if self.num_records == 0:
            raise ValueError(f"source {source.name!r} is empty")
        self.epoch = 0
        self.cursor = 0
        self.counter = BadSampleCounter()
        # This shard's record indices for one epoch, keyed by (epoch, g, G): the shard is part of the key
        # because a copy made in the main process may be iterated in a worker.
        self._order: torch.Tensor | None = None
        self._order_key: tuple[int, int, int] | None = None
        self._pending_shard: tuple[int, int] | None = None  # from a loaded state, checked once resolved
        self._bad_streak = 0  # consecutive bad records, to detect a shard with nothing loadable
        # Record index of the sample returned last: a packer that buffers samples checkpoints these
        # indices and reloads them with ``source.load`` on resume.
        self.last_index: int | None = None

    # ---- shard geometry

    def _resolve_worker(self) -> tuple[int, int]:
        # Not cached when taken from the DataLoader: a stream touched in the main process (e.g. its
        # state_dict) and then copied into workers must not keep the main process's (0, 1).
        worker_id, num_workers = self._worker if self._worker is not None else worker_shard_info()
        if num_workers < 1 or not 0 <= worker_id < num_workers:
            raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
        return worker_id, num_workers

    @property
    def shard(self) -> tuple[int, int]:
        """``(g, G)``: this stream's global shard id and the number of shards."""
        worker_id, num_workers = self._resolve_worker()
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    @property
    def shard_size(self) -> int:
        """Records this shard visits per epoch."""
        g, num_shards = self.shard
        return shard_size(self.num_records, g, num_shards)

    def _check_shard(self) -> None:
        g, num_shards = self.shard
        if num_shards > self.num_records:
            raise ValueError(
                f"source {self.source.name!r} has {self.num_records} records, fewer than the {num_shards} "
                f"shards (world_size x num_workers); some shards would never yield anything"
            )
        if self._pending_shard is not None and self._pending_shard != (g, num_shards):
            raise ValueError(
                f"state was saved by shard {self._pending_shard[0]} of {self._pending_shard[1]}, but this stream "
                f"is shard {g} of {num_shards}; resuming with a different world size or worker count is not exact"
            )
        self._pending_shard = None

    def _epoch_order(self) -> torch.Tensor:
        g, num_shards = self.shard
        key = (self.epoch, g, num_shards)
        if self._order_key != key:
            self._order = epoch_permutation(self.num_records, self.seed, self.epoch)[g::num_shards].clone()
            self._order_key = key
        return self._order

    # ---- iteration

    def __iter__(self) -> ShardedStream:
        return self

    def __next__(self) -> PlanSample:
        self._check_shard()
        while True:
            order = self._epoch_order()
            if self.cursor >= len(order):
                self.epoch += 1
                self.cursor = 0
                continue
            index = int(order[self.cursor])
            self.cursor += 1
            try:
                sample = self.source.load(index)
            except BadSample as bad:
                self._record_bad(bad, len(order))
                continue
            self.counter.add_good()
            self._bad_streak = 0
            self.last_index = index
            return sample

    def _record_bad(self, bad: BadSample, epoch_len: int) -> None:
        self.counter.add_bad(bad.reason)
        self._bad_streak += 1
        level = logging.WARNING if self.counter.bad[bad.reason] <= _WARN_PER_REASON else logging.DEBUG
        logger.log(level, "%s: skipping bad sample (%s)", self.source.name, bad)
        what = f"source {self.source.name!r} shard {self.shard[0]}/{self.shard[1]}"
        self.counter.check(self.max_bad_fraction, self.min_seen, what=what)
        if self._bad_streak >= epoch_len:
            raise DataQualityError(f"{what}: no loadable record in a whole epoch ({self.counter.summary()})")

    # ---- resume

    def state_dict(self) -> dict[str, Any]:
        """Position of the next record plus the bad-sample counts (plain ints; JSON-serialisable)."""
        g, num_shards = self.shard
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "counter": self.counter.state_dict(),
            "seed": self.seed,
            "num_records": self.num_records,
            "shard": [g, num_shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; same source, seed and sharding are required."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state seed {state['seed']} != stream seed {self.seed}")
        if state.get("num_records", self.num_records) != self.num_records:
            raise ValueError(
                f"state was saved for {state['num_records']} records but source {self.source.name!r} has "
                f"{self.num_records}; the epoch permutation would differ"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.counter.load_state_dict(state["counter"])
        self._bad_streak = 0
        # The worker id may be unknown until the first next() inside a DataLoader worker.
        self._pending_shard = tuple(state["shard"]) if "shard" in state else None
