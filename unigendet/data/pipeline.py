"""Token-budget packing over a weighted mixture of sources, and the resumable DataLoader.

Per rank, each DataLoader worker plays one *role* (a shard of every source) and yields packed
batches, each with the role's state *after* producing it. The main process keeps the state of the
last batch it consumed from each role, so a checkpoint holds exactly what was trained on; on
resume, the fresh DataLoader's worker ``w`` plays role ``(w + next_role) % num_workers``, which
reproduces the uninterrupted order (DataLoader yields workers round-robin).

Packing follows the reference (§3.7) with one change: a sample that does not fit the current pack
is carried into the next one instead of being dropped, so every sample of the shard is trained on.
The carried sample goes in after the next pack's mandatory samples, and only if it fits beside them
(otherwise it waits at the buffer head), so a pack never exceeds ``max_num_tokens`` because of it.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset

from unigendet.data.packing import (
    CFGDropout,
    PackBuilder,
    PackedBatch,
    PackGeometry,
    PlanSample,
)
from unigendet.data.sharding import ShardedStream, epoch_seed, worker_shard_info
from unigendet.data.sources import BadSample, BadSampleCounter, DataQualityError

logger = logging.getLogger(__name__)


@dataclass
class PackingLimits:
    expected_num_tokens: int
    max_num_tokens: int
    prefer_buffer_before: int
    max_buffer_size: int


@dataclass
class _Entry:
    source: str
    index: int
    sample: PlanSample


class TokenBudgetPacker:
    """Groups samples from several streams into packs of about ``expected_num_tokens``."""

    def __init__(self, streams: dict[str, ShardedStream], weights: dict[str, float], mandatory: list[str],
                 limits: PackingLimits, rng: random.Random):
        self.streams = streams
        self.names = [n for n in streams if weights[n] > 0]
        self.weights = [weights[n] for n in self.names]
        self.mandatory = mandatory
        self.limits = limits
        self.rng = rng
        self.buffer: deque[_Entry] = deque()
        self.carry: _Entry | None = None

    def _draw(self, name: str) -> _Entry:
        stream = self.streams[name]
        sample = next(stream)
        return _Entry(name, stream.last_index, sample)

    def next_pack(self) -> list[_Entry]:
        lim = self.limits
        pack: list[_Entry] = []
        tokens = 0
        for name in self.mandatory:
            entry = self._draw(name)
            pack.append(entry)
            tokens += entry.sample.num_tokens
        if self.carry is not None:
            # The carried sample joins only if it fits beside this pack's mandatory samples (carry +
            # mandatory could otherwise exceed max_num_tokens). If not, it waits at the buffer head, or,
            # with a full buffer, stays the carry and this pack closes with its mandatory samples alone.
            carry, self.carry = self.carry, None
            if tokens + carry.sample.num_tokens <= lim.max_num_tokens:
                pack.append(carry)
                tokens += carry.sample.num_tokens
            elif len(self.buffer) < lim.max_buffer_size:
                self.buffer.appendleft(carry)
            else:
                self.carry = carry
                return pack
        while tokens < lim.expected_num_tokens:
            from_buffer = tokens < lim.prefer_buffer_before and bool(self.buffer)
            entry = self.buffer.popleft() if from_buffer else self._draw(self.rng.choices(self.names, self.weights)[0])
            n = entry.sample.num_tokens
            if tokens + n > lim.max_num_tokens:
                if not from_buffer and len(self.buffer) < lim.max_buffer_size:
                    self.buffer.append(entry)
                    continue
                if pack:
                    self.carry = entry
                    break
            pack.append(entry)
            tokens += n
        return pack

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": {n: s.state_dict() for n, s in self.streams.items()},
            "buffer": [(e.source, e.index) for e in self.buffer],
            "carry": None if self.carry is None else (self.carry.source, self.carry.index),
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, s in state["streams"].items():
            self.streams[name].load_state_dict(s)

        def reload(ref) -> _Entry | None:
            name, index = ref
            stream = self.streams[name]
            try:
                return _Entry(name, index, stream.source.load(index))
            except BadSample as bad:
                # The record went bad since the checkpoint (e.g. a deleted image): count it, go on.
                stream.counter.add_bad(bad.reason)
                logger.warning("resume: buffered sample can no longer be loaded (%s); skipped", bad)
                return None

        self.buffer = deque(e for e in map(reload, state["buffer"]) if e is not None)
        self.carry = None if state["carry"] is None else reload(state["carry"])
        self.rng.setstate(state["rng"])


@dataclass
class PackItem:
    batch: PackedBatch
    role: int
    state: dict[str, Any]
    counters: dict[str, dict]


class PackedIterable(IterableDataset):
    """One rank's stream of packed batches (workers split the rank's shard by role)."""

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], mandatory: list[str], limits: PackingLimits,
                 special, geometry: PackGeometry, cfg_dropout: CFGDropout, seed: int, rank: int, world_size: int,
                 max_bad_fraction: float, min_seen: int):
        super().__init__()
        self.sources, self.weights, self.mandatory, self.limits = sources, weights, mandatory, limits
        self.special, self.geometry, self.cfg_dropout = special, geometry, cfg_dropout
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.role_offset = 0
        self.role_states: dict[int, dict[str, Any]] = {}

    def _make(self, role: int, num_workers: int) -> tuple[TokenBudgetPacker, PackBuilder]:
        streams = {
            name: ShardedStream(src, self.seed, self.rank, self.world_size, role, num_workers,
                                self.max_bad_fraction, self.min_seen)
            for name, src in self.sources.items()
        }
        # Stable across interpreters (Python's hash of tuples is not guaranteed to be).
        role_seed = epoch_seed(self.seed, 1_000_003 * (self.rank + 1) + role) & 0xFFFFFFFF
        packer = TokenBudgetPacker(streams, self.weights, self.mandatory, self.limits, random.Random(role_seed))
        builder = PackBuilder(self.special, self.geometry, self.cfg_dropout, random.Random(role_seed + 1))
        if role in self.role_states:
            state = self.role_states[role]
            packer.load_state_dict(state["packer"])
            builder.rng.setstate(state["cfg_rng"])
        return packer, builder

    def __iter__(self) -> Iterator[PackItem]:
        worker_id, num_workers = worker_shard_info()
        role = (worker_id + self.role_offset) % num_workers
        packer, builder = self._make(role, num_workers)
        while True:
            entries = packer.next_pack()
            batch = builder.build_with_teacher([e.sample for e in entries])
            state = {"packer": packer.state_dict(), "cfg_rng": builder.rng.getstate()}
            counters = {n: s.counter.state_dict() for n, s in packer.streams.items()}
            yield PackItem(batch, role, state, counters)


def build_source(name: str, sc, encoder, seed: int):
    """A source object from its ``SourceConfig``."""
    from unigendet.data.sources import FakeClueSource, TextToImageSource

    if sc.kind == "fakeclue":
        return FakeClueSource(sc.json_path, sc.image_root, encoder, label_convention=sc.label_convention,
                              balance_classes=sc.balance_classes, seed=seed, split=sc.split,
                              heldout_fraction=sc.heldout_fraction, name=name)
    return TextToImageSource(sc.data_files, encoder, image_column=sc.image_column, caption_column=sc.caption_column,
                             key_column=sc.key_column, image_root=sc.image_root, cache_dir=sc.cache_dir, split=sc.split,
                             heldout_fraction=sc.heldout_fraction, name=name)


def _identity(x):
    return x


class PackedDataLoader:
    """Iterates packed batches; ``state_dict``/``load_state_dict`` give exact resume."""

    def __init__(self, iterable: PackedIterable, num_workers: int, prefetch_factor: int,
                 max_bad_fraction: float, min_seen: int, overfit_batches: int = 0):
        self.iterable = iterable
        self.overfit_batches = overfit_batches
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.role_states: dict[int, dict[str, Any]] = {}
        self.counters: dict[int, dict[str, dict]] = {}
        self.next_role = 0
        self._loader: DataLoader | None = None

    @classmethod
    def from_config(cls, cfg, tokenizer, special, rank: int, world_size: int) -> "PackedDataLoader":
        from unigendet.data.sources import SampleEncoder
        from unigendet.data.synthetic import pack_geometry
        from unigendet.data.transforms import ImageTransform

        data = cfg.data
        geometry = pack_geometry(cfg.model)
        t = data.vit_transform
        v = data.vae_transform
        encoder = SampleEncoder(tokenizer, geometry, ImageTransform(t.max_size, t.min_size, t.stride, t.max_pixels),
                                ImageTransform(v.max_size, v.min_size, v.stride, v.max_pixels), smsa=data.smsa,
                                max_tokens_per_sample=data.packing.max_num_tokens_per_sample,
                                diga_teacher_prompt=cfg.diga.teacher_prompt if cfg.stage == "diga" else None,
                                diga_prompt_before_vit=cfg.diga.prompt_before_vit)
        sources = {name: build_source(name, sc, encoder, data.seed) for name, sc in data.sources.items()}
        p = data.packing
        limits = PackingLimits(p.expected_num_tokens, p.max_num_tokens, p.prefer_buffer_before, p.max_buffer_size)
        iterable = PackedIterable(
            sources, {n: s.weight for n, s in data.sources.items()},
            [n for n, s in data.sources.items() if s.mandatory], limits, special, geometry, data.cfg_dropout,
            data.seed, rank, world_size, data.max_bad_fraction, data.min_seen_for_bad_check,
        )
        return cls(iterable, data.num_workers, data.prefetch_factor, data.max_bad_fraction, data.min_seen_for_bad_check,
                   data.overfit_batches)

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.overfit_batches:
            yield from self._overfit()
            return
        yield from self._stream()

    def _overfit(self) -> Iterator[PackedBatch]:
        cached = []
        stream = self._stream()
        for batch in stream:
            cached.append(batch)
            if len(cached) == self.overfit_batches:
                break
        stream.close()  # shut the DataLoader workers down; they are not needed any more
        while True:
            yield from cached

    def _stream(self) -> Iterator[PackedBatch]:
        self.iterable.role_states = dict(self.role_states)
        self.iterable.role_offset = self.next_role
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        self._loader = DataLoader(self.iterable, batch_size=None, num_workers=self.num_workers,
                                  collate_fn=_identity, **kwargs)
        roles = max(self.num_workers, 1)
        for item in self._loader:
            self.role_states[item.role] = item.state
            self.counters[item.role] = item.counters
            self.next_role = (item.role + 1) % roles
            yield item.batch

    def counter(self) -> BadSampleCounter:
        total = BadSampleCounter()
        for per_source in self.counters.values():
            for state in per_source.values():
                c = BadSampleCounter()
                c.load_state_dict(state)
                total.merge(c)
        return total

    def check_quality(self) -> None:
        self.counter().check(self.max_bad_fraction, self.min_seen, what="training data")

    def summary(self) -> str:
        return self.counter().summary()

    def state_dict(self) -> dict[str, Any]:
        # A snapshot: the live dicts keep changing as batches are consumed after the save.
        return copy.deepcopy({"role_states": self.role_states, "counters": self.counters,
                              "next_role": self.next_role, "num_workers": self.num_workers})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.overfit_batches:
            # Overfitting cycles the run's first packs: restart from the initial data state.
            return
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"data state was saved with num_workers={state['num_workers']} but this run uses "
                             f"{self.num_workers}; the shard assignment would differ")
        self.role_states = copy.deepcopy(dict(state["role_states"]))
        self.counters = copy.deepcopy(dict(state["counters"]))
        self.next_role = state["next_role"]

    def close(self) -> None:
        if self.counters:
            logger.info("data: %s", self.summary())
        self._loader = None


__all__ = ["DataQualityError", "PackedDataLoader", "PackedIterable", "PackingLimits", "TokenBudgetPacker"]
