"""Token-budget packing over a weighted mixture of sources, and the DataLoader that resumes exactly where a
checkpoint left off.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import signal
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from torch.utils.data import DataLoader, IterableDataset

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_probability, require_range
from unigendet.data.encoding import SampleEncoder, SampleHook
from unigendet.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DecodeLimits
from unigendet.data.packing import (
    CFGDropout,
    PackBuilder,
    PackedBatch,
    PackGeometry,
    PlanSample,
)
from unigendet.data.quality import BadSample, BadSampleCounter, DataQualityError
from unigendet.data.sharding import ShardedStream, epoch_seed, worker_shard_info
from unigendet.data.tokenizer import SpecialTokenIds
from unigendet.data.transforms import ImageTransform

logger = logging.getLogger(__name__)


@dataclass
class PackingConfig:
    """Token budget of one pack (per rank and micro-step). Reference: 32768 / 36864 / 16384 / 50 and
    16384 tokens at most per sample (longer samples are skipped as ``too_long``)."""

    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    prefer_buffer_before: int = 16384
    max_buffer_size: int = 50
    max_num_tokens_per_sample: int = 16384

    def validate(self) -> None:
        require_range("max_num_tokens", self.max_num_tokens, 1)
        require_range("max_num_tokens_per_sample", self.max_num_tokens_per_sample, 1, self.max_num_tokens)
        require_range("expected_num_tokens", self.expected_num_tokens, 1, self.max_num_tokens)
        require_non_negative("prefer_buffer_before", self.prefer_buffer_before)
        require_non_negative("max_buffer_size", self.max_buffer_size)


@dataclass
class _Entry:
    source: str
    index: int
    sample: PlanSample


class TokenBudgetPacker:
    """Groups samples from several streams into packs of about ``expected_num_tokens``.

    BAGEL's packing rule: each pack starts with one sample of every mandatory source; then, while the pack is
    below ``prefer_buffer_before`` tokens, the overflow buffer is drained first, otherwise a source is drawn
    with probability proportional to its weight; a sample that would exceed ``max_num_tokens`` goes to the
    buffer while it has room. One change: where BAGEL drops a sample that fits neither the pack nor the buffer,
    here it is carried into the next pack, so every sample of the shard is trained on. The carried sample goes
    in after the next pack's mandatory samples, and only if it fits beside them (otherwise it waits at the
    buffer head), so a pack never exceeds ``max_num_tokens`` because of it.
    """

    def __init__(self, streams: dict[str, ShardedStream], weights: dict[str, float], mandatory: list[str],
                 limits: PackingConfig, rng: random.Random):
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

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], mandatory: list[str], limits: PackingConfig,
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
            batch = builder.build_samples([e.sample for e in entries])
            state = {"packer": packer.state_dict(), "cfg_rng": builder.rng.getstate()}
            counters = {n: s.counter.state_dict() for n, s in packer.streams.items()}
            yield PackItem(batch, role, state, counters)


@dataclass
class SourceConfig:
    """One dataset. ``fakeclue``: a FakeClue-format JSON list + image root (detection samples);
    ``t2i``: ``data_files`` (parquet / arrow / jsonl files or globs, or ``save_to_disk`` directories)
    with image + caption columns; relative image paths resolve against ``image_root``. A FakeClue
    ``json_path`` may be a JSON list or JSONL (one entry per line)."""

    kind: Literal["fakeclue", "t2i"]
    weight: float = 1.0
    # Every pack starts with one sample of each mandatory source (the reference's is_mandatory).
    mandatory: bool = False
    split: Literal["train", "heldout", "all"] = "train"
    heldout_fraction: float = 0.0
    # fakeclue
    json_path: str | None = None
    image_root: str | None = None
    label_convention: Literal["fakeclue", "real0_fake1"] = "fakeclue"
    balance_classes: bool = False
    # t2i
    data_files: list[str] = field(default_factory=list)
    image_column: str = "image"
    caption_column: str = "caption"
    # "json_dict": each caption cell is a JSON object of named captions (BAGEL's T2I parquet `captions`); one is
    # used per row, chosen from the row key and the data seed (unigendet.data.bagel_formats.choose_caption).
    caption_format: Literal["text", "json_dict"] = "text"
    key_column: str | None = None
    # Read parquet files in place, row group by row group, instead of copying them into the Arrow cache.
    streaming: bool = False
    cached_row_groups: int = 2
    # Where `datasets` keeps its Arrow copy of t2i files (default: the `datasets` cache).
    cache_dir: str | None = None
    # Image paths from the dataset files must stay inside their root; absolute ones are bad samples unless this
    # is on (tables that list files anywhere, e.g. `datasets` directories built from local files).
    allow_absolute_paths: bool = False
    # Larger images (encoded bytes, or width x height read from the header) are bad samples "too_large".
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def validate(self) -> None:
        require_non_negative("weight", self.weight)
        require_range("max_image_bytes", self.max_image_bytes, 1)
        require_range("max_image_pixels", self.max_image_pixels, 1)
        require_probability("heldout_fraction", self.heldout_fraction, one_allowed=False)
        require_range("cached_row_groups", self.cached_row_groups, 1)
        if self.kind == "fakeclue" and not (self.json_path and self.image_root):
            raise ConfigError("a fakeclue source needs json_path and image_root")
        if self.kind == "t2i" and not self.data_files:
            raise ConfigError("a t2i source needs data_files")


def build_source(name: str, sc: SourceConfig, encoder: SampleEncoder, seed: int):
    """The source named ``name`` from its config; ``seed`` drives class balancing (FakeClue)."""
    from unigendet.data.fakeclue import FakeClueSource
    from unigendet.data.t2i import TextToImageSource

    limits = DecodeLimits(max_bytes=sc.max_image_bytes, max_pixels=sc.max_image_pixels)
    if sc.kind == "fakeclue":
        return FakeClueSource(sc.json_path, sc.image_root, encoder, label_convention=sc.label_convention,
                              balance_classes=sc.balance_classes, seed=seed, split=sc.split,
                              heldout_fraction=sc.heldout_fraction, name=name,
                              allow_absolute_paths=sc.allow_absolute_paths, decode_limits=limits)
    return TextToImageSource(sc.data_files, encoder, image_column=sc.image_column, caption_column=sc.caption_column,
                             key_column=sc.key_column, image_root=sc.image_root, cache_dir=sc.cache_dir, split=sc.split,
                             heldout_fraction=sc.heldout_fraction, name=name,
                             allow_absolute_paths=sc.allow_absolute_paths, decode_limits=limits,
                             caption_format=sc.caption_format, caption_seed=seed, streaming=sc.streaming,
                             cached_row_groups=sc.cached_row_groups)


def _identity(x):
    return x


class ShieldFromSignals:
    """DataLoader ``worker_init_fn``: the worker survives ``signals`` sent by anyone but its parent.

    A scheduler preempting a job signals every process of it, DataLoader workers included; torch's worker
    handler exits on SIGTERM, and SIGUSR1's default action kills, while the main process still needs its
    workers to finish the step it checkpoints. The signals are blocked and taken by a thread: SIGTERM from
    the parent (how DataLoader and multiprocessing stop a worker) still ends the worker at once, as torch's
    own handler does; anything else is dropped. A worker whose parent died stops through torch's watchdog."""

    def __init__(self, signals: tuple[int, ...]):
        self.signals = signals

    def __call__(self, worker_id: int) -> None:
        waited = set(self.signals)
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        threading.Thread(target=_take_signals, args=(waited, os.getppid()), daemon=True,
                         name="signal-shield").start()


def _take_signals(signals: set[int], parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


@dataclass
class TransformConfig:
    """Image resize rule of one encoder path (see ``ImageTransform``)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int

    def validate(self) -> None:
        require_range("stride", self.stride, 1)
        require_range("max_pixels", self.max_pixels, 1)
        if not 0 < self.min_size <= self.max_size:
            raise ConfigError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.max_size % self.stride or self.min_size % self.stride:
            raise ConfigError(f"max_size and min_size must be multiples of stride {self.stride}")

    def build(self) -> ImageTransform:
        return ImageTransform(self.max_size, self.min_size, self.stride, self.max_pixels)


@dataclass
class DataConfig:
    """The packed training data: sources, packing budget, image transforms, CFG dropout, workers."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    packing: PackingConfig = field(default_factory=PackingConfig)
    vit_transform: TransformConfig = field(default_factory=lambda: TransformConfig(980, 224, 14, 2_007_040))
    vae_transform: TransformConfig = field(default_factory=lambda: TransformConfig(1024, 512, 16, 1_806_336))
    cfg_dropout: CFGDropout = field(default_factory=lambda: CFGDropout(0.1, 0.3, 0.3))
    # SMSA: the clean VAE latent block precedes the ViT block in detection samples (paper ablation: false).
    smsa: bool = True
    num_workers: int = 1
    prefetch_factor: int = 2
    # Bad samples are skipped and counted; above this fraction (after min_seen samples) training stops.
    max_bad_fraction: float = 0.05
    min_seen_for_bad_check: int = 200
    seed: int = 40
    # Debugging: cycle the first N packs forever (loss must then fall); 0 = off.
    overfit_batches: int = 0

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: at least one data source is required")
        if sum(s.weight for s in self.sources.values()) <= 0:
            raise ConfigError("sources: weights must not all be zero")
        for name in ("text", "vit", "vae"):
            require_probability(f"cfg_dropout.{name}", getattr(self.cfg_dropout, name))
        require_probability("max_bad_fraction", self.max_bad_fraction)
        require_non_negative("min_seen_for_bad_check", self.min_seen_for_bad_check)
        require_non_negative("num_workers", self.num_workers)
        require_range("prefetch_factor", self.prefetch_factor, 1)
        require_non_negative("seed", self.seed)
        require_non_negative("overfit_batches", self.overfit_batches)

    def source_kinds(self) -> set[str]:
        return {s.kind for s in self.sources.values()}


class PackedDataLoader:
    """Iterates packed batches; ``state_dict``/``load_state_dict`` give exact resume.

    Per rank, each DataLoader worker plays one *role* (a shard of every source) and yields packed batches,
    each with the role's state *after* producing it. The main process keeps the state of the last batch it
    consumed from each role, so a checkpoint holds exactly what was trained on; on resume, the fresh
    DataLoader's worker ``w`` plays role ``(w + next_role) % num_workers``, which reproduces the uninterrupted
    order (DataLoader yields workers round-robin).
    """

    def __init__(self, iterable: PackedIterable, num_workers: int, prefetch_factor: int,
                 max_bad_fraction: float, min_seen: int, overfit_batches: int = 0,
                 worker_shielded_signals: tuple[int, ...] = ()):
        self.iterable = iterable
        self.worker_shielded_signals = tuple(int(s) for s in worker_shielded_signals)
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
    def build(cls, cfg: DataConfig, tokenizer, special: SpecialTokenIds, geometry: PackGeometry, rank: int,
              world_size: int, t2i_hooks: tuple[SampleHook, ...] = (),
              worker_shielded_signals: tuple[int, ...] = ()) -> "PackedDataLoader":
        """This rank's loader. ``geometry`` is the model's patch and latent grid; ``t2i_hooks`` are
        called for every text-to-image sample (extra views an objective reads). The worker processes
        survive ``worker_shielded_signals`` (the trainer's preemption signals, which the main process handles)."""
        encoder = SampleEncoder(tokenizer, geometry, cfg.vit_transform.build(), cfg.vae_transform.build(),
                                smsa=cfg.smsa, max_tokens_per_sample=cfg.packing.max_num_tokens_per_sample,
                                t2i_hooks=tuple(t2i_hooks))
        sources = {name: build_source(name, sc, encoder, cfg.seed) for name, sc in cfg.sources.items()}
        iterable = PackedIterable(
            sources, {n: s.weight for n, s in cfg.sources.items()},
            [n for n, s in cfg.sources.items() if s.mandatory], cfg.packing, special, geometry, cfg.cfg_dropout,
            cfg.seed, rank, world_size, cfg.max_bad_fraction, cfg.min_seen_for_bad_check,
        )
        return cls(iterable, cfg.num_workers, cfg.prefetch_factor, cfg.max_bad_fraction, cfg.min_seen_for_bad_check,
                   cfg.overfit_batches, worker_shielded_signals)

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
        if self.num_workers > 0 and self.worker_shielded_signals:
            kwargs["worker_init_fn"] = ShieldFromSignals(self.worker_shielded_signals)
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


__all__ = ["DataQualityError", "PackedDataLoader", "PackedIterable", "PackingConfig", "TokenBudgetPacker"]
