"""Labelled images of a dataset folder layout, in shuffled batches per rank, with exact resume.

The training data of the baseline detectors: one split of a layout of :mod:`unigendet.data.layouts` (GenImage,
UniversalFakeDetect, DRCT-2M, DeepfakeBench), read with :func:`~unigendet.data.layouts.index_layout`, decoded by
:func:`~unigendet.data.images.load_image_file` in DataLoader workers and handed out as PIL images with their
internal labels (1 = fake). Turning images into tensors is the detector's job (its own preprocessing), so this
module knows nothing of models.

Order: epoch ``e`` visits the split's records in a permutation that depends only on ``(seed, e)``
(``shuffle: false`` keeps the index order); rank ``r`` of ``W`` takes positions ``r, r + W, ...`` and cuts them
into batches of ``batch_size`` (the last one of an epoch may be smaller). The position (epoch, batches consumed)
and the bad-image counts are the loader's state, saved with every checkpoint, so a resumed run sees exactly the
batches an uninterrupted one would. An image that cannot be decoded is left out of its batch and counted by
reason (:class:`~unigendet.data.quality.BadSampleCounter`); the run stops with ``DataQualityError`` when more than
``max_bad_fraction`` of the images seen are bad.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_probability, require_range
from unigendet.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DecodeLimits, load_image_file
from unigendet.data.layouts import LAYOUTS, ImageRecord, LayoutError, index_layout
from unigendet.data.pipeline import ShieldFromSignals
from unigendet.data.quality import BadSample, BadSampleCounter
from unigendet.data.sharding import epoch_permutation, epoch_seed

logger = logging.getLogger(__name__)


@dataclass
class ImageFolderConfig:
    """One split of a dataset layout as training batches.

    ``layout``: ``genimage`` / ``ufd`` / ``drct2m`` / ``deepfakebench``; ``root``: the layout's root folder
    (DeepfakeBench: the frames root, with the dataset JSON in ``json_path``); ``groups`` (generators, subsets,
    datasets) and ``categories`` (UFD object classes, DeepfakeBench label names) select; ``options``: further
    keyword options of the layout's index function (e.g. ``root_split`` for UFD, ``frames_per_video``);
    ``landmarks``: hand each image's face-landmark array (DeepfakeBench) to the detector.
    """

    layout: str = "genimage"
    root: str | None = None
    json_path: str | None = None
    split: str = "train"
    groups: list[str] | None = None
    categories: list[str] | None = None
    limit_per_group: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    landmarks: bool = False
    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 1
    prefetch_factor: int = 2
    max_bad_fraction: float = 0.05
    min_seen_for_bad_check: int = 200
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Debugging: cycle the first N batches forever (the loss must then fall); 0 = off.
    overfit_batches: int = 0

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout: {self.layout!r} is not one of {sorted(LAYOUTS)}")
        # ``root`` is checked by the stage that reads this section (see ``require_root``), so a run of another
        # stage can print and reload its config with this section at its defaults.
        if (self.layout == "deepfakebench") != (self.json_path is not None):
            raise ConfigError("json_path (the dataset JSON) is required for layout 'deepfakebench' and only there")
        reserved = {"groups", "splits", "limit_per_group", "categories"} & set(self.options)
        if reserved:
            raise ConfigError(f"options: {sorted(reserved)} have keys of their own in this section")
        if self.categories is not None and self.layout not in ("ufd", "deepfakebench"):
            raise ConfigError(f"categories: layout {self.layout!r} has no categories (ufd and deepfakebench do)")
        require_range("batch_size", self.batch_size, 1)
        require_non_negative("num_workers", self.num_workers)
        require_range("prefetch_factor", self.prefetch_factor, 1)
        require_non_negative("seed", self.seed)
        require_probability("max_bad_fraction", self.max_bad_fraction)
        require_non_negative("min_seen_for_bad_check", self.min_seen_for_bad_check)
        require_range("max_image_bytes", self.max_image_bytes, 1)
        require_range("max_image_pixels", self.max_image_pixels, 1)
        require_non_negative("overfit_batches", self.overfit_batches)

    def require_root(self, prefix: str) -> None:
        if not self.root:
            raise ConfigError(f"{prefix}.root is required (the layout's root folder)")

    def input_problems(self, prefix: str) -> list[str]:
        """The folders and files this section names that do not exist (one message per key)."""
        problems = []
        if self.root and not Path(self.root).is_dir():
            problems.append(f"{prefix}.root: no such directory: {self.root}")
        if self.json_path and not Path(self.json_path).exists():
            problems.append(f"{prefix}.json_path: no such file or directory: {self.json_path}")
        return problems

    def index(self) -> list[ImageRecord]:
        """The selected split's records, in the layout's deterministic order; LayoutError when there are none."""
        positional = (self.json_path, self.root) if self.layout == "deepfakebench" else (self.root,)
        options = dict(self.options)
        if self.layout == "deepfakebench" and self.categories is not None:
            options["categories"] = self.categories
        index = index_layout(self.layout, *positional, groups=self.groups, splits=[self.split],
                             limit_per_group=self.limit_per_group, **options)
        records = index.records
        if self.layout == "ufd" and self.categories is not None:
            records = [r for r in records if r.category in self.categories]
        if not records:
            raise LayoutError(f"{self.root}: no {self.layout} image in split {self.split!r} with groups={self.groups} "
                              f"categories={self.categories}")
        if index.skipped:
            logger.warning("%s: %d entries left out (e.g. %s)", self.root, len(index.skipped), index.skipped[0])
        return records


@dataclass
class ImageFolderBatch:
    """Decoded images with internal labels (1 = fake), record keys and per-image extras (``landmarks``)."""

    images: list[Image.Image]
    labels: list[int]
    keys: list[str]
    extras: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class _Loaded:
    """One record's outcome in a worker: the image (and landmarks) or the reason it is unusable."""

    index: int
    image: Image.Image | None
    landmarks: np.ndarray | None
    bad: BadSample | None


class _RecordImages(Dataset):
    """Record ``i`` -> ``_Loaded`` (decoding in the DataLoader worker)."""

    def __init__(self, records: list[ImageRecord], limits: DecodeLimits, landmarks: bool):
        self.records = records
        self.limits = limits
        self.landmarks = landmarks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> _Loaded:
        record = self.records[i]
        try:
            image = load_image_file(record.path, self.limits)
            points = self._landmarks(record) if self.landmarks else None
        except BadSample as bad:
            return _Loaded(i, None, None, bad)
        return _Loaded(i, image, points, None)

    @staticmethod
    def _landmarks(record: ImageRecord) -> np.ndarray | None:
        if record.landmarks is None:
            return None
        try:
            return np.load(record.landmarks, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise BadSample("malformed_entry", f"{record.landmarks}: landmarks unreadable: {err}") from None


def _as_list(items):
    return items


class ImageFolderLoader:
    """This rank's batches of one split, forever (epoch after epoch); ``state_dict`` / ``load_state_dict`` give
    exact resume, ``check_quality`` enforces the bad-image budget."""

    def __init__(self, cfg: ImageFolderConfig, records: list[ImageRecord], rank: int, world_size: int,
                 worker_shielded_signals: tuple[int, ...] = ()):
        self.cfg = cfg
        self.records = records
        self.rank = rank
        self.world_size = world_size
        self.worker_shielded_signals = tuple(int(s) for s in worker_shielded_signals)
        self.dataset = _RecordImages(records, DecodeLimits(cfg.max_image_bytes, cfg.max_image_pixels), cfg.landmarks)
        self.epoch = 0
        self.position = 0  # batches of the current epoch consumed
        self.counter = BadSampleCounter()
        if len(records) < world_size:
            raise LayoutError(f"{cfg.root}: {len(records)} images in split {cfg.split!r} for {world_size} ranks")

    @classmethod
    def build(cls, cfg: ImageFolderConfig, rank: int, world_size: int,
              worker_shielded_signals: tuple[int, ...] = ()) -> ImageFolderLoader:
        records = cfg.index()
        fakes = sum(r.label for r in records)
        logger.info("%s %s split %r: %d images (%d real, %d fake); batches of %d per rank, %d ranks", cfg.layout,
                    cfg.root, cfg.split, len(records), len(records) - fakes, fakes, cfg.batch_size, world_size)
        return cls(cfg, records, rank, world_size, worker_shielded_signals)

    # ------------------------------------------------------------------------------------------- order
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's record indices of epoch ``epoch``, cut into batches."""
        n = len(self.records)
        order = epoch_permutation(n, self.cfg.seed, epoch).tolist() if self.cfg.shuffle else list(range(n))
        mine = order[self.rank::self.world_size]
        size = self.cfg.batch_size
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def sample(self, count: int) -> tuple[list[Image.Image], list[int]]:
        """The first ``count`` decodable images of epoch 0's full order (the same on every rank) with their
        labels: data for statistics fitted once at start-up."""
        order = epoch_permutation(len(self.records), self.cfg.seed, 0).tolist()
        images, labels = [], []
        for i in order:
            if len(images) == count:
                break
            loaded = self.dataset[i]
            if loaded.image is not None:
                images.append(loaded.image)
                labels.append(self.records[i].label)
        return images, labels

    # ------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[ImageFolderBatch]:
        if self.cfg.overfit_batches:
            yield from self._overfit()
            return
        while True:
            yield from self._epoch()
            self.epoch += 1
            self.position = 0

    def _overfit(self) -> Iterator[ImageFolderBatch]:
        cached: list[ImageFolderBatch] = []
        for batch in self._epoch():
            cached.append(batch)
            if len(cached) == self.cfg.overfit_batches:
                break
        while True:
            yield from cached

    def _epoch(self) -> Iterator[ImageFolderBatch]:
        batches = self.epoch_batches(self.epoch)[self.position:]
        if not batches:
            return
        kwargs: dict[str, Any] = {}
        if self.cfg.num_workers > 0:
            kwargs["prefetch_factor"] = self.cfg.prefetch_factor
            if self.worker_shielded_signals:
                kwargs["worker_init_fn"] = ShieldFromSignals(self.worker_shielded_signals)
        # A generator of its own: the DataLoader draws its workers' base seed from it, which would otherwise
        # consume the global RNG (that the detectors' crops and dropout draw from) at every epoch start.
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, self.epoch))
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.cfg.num_workers,
                            collate_fn=_as_list, generator=generator, **kwargs)
        for loaded in loader:
            self.position += 1
            batch = self._batch(loaded)
            if len(batch):
                yield batch

    def _batch(self, loaded: list[_Loaded]) -> ImageFolderBatch:
        images, labels, keys, landmarks = [], [], [], []
        for item in loaded:
            if item.bad is not None:
                self.counter.add_bad(item.bad.reason)
                logger.debug("bad image skipped: %s", item.bad)
                continue
            self.counter.add_good()
            record = self.records[item.index]
            images.append(item.image)
            labels.append(record.label)
            keys.append(record.key)
            landmarks.append(item.landmarks)
        extras = {"landmarks": landmarks} if self.cfg.landmarks else {}
        return ImageFolderBatch(images, labels, keys, extras)

    # ------------------------------------------------------------------------------------------- state
    def check_quality(self) -> None:
        self.counter.check(self.cfg.max_bad_fraction, self.cfg.min_seen_for_bad_check, what="training images")

    def summary(self) -> str:
        return self.counter.summary()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "counter": copy.deepcopy(self.counter.state_dict()),
                "num_records": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.overfit_batches:
            return  # overfitting cycles the run's first batches: restart from them
        if state["num_records"] != len(self.records):
            raise ValueError(f"data state was saved for {state['num_records']} images but split {self.cfg.split!r} "
                             f"of {self.cfg.root} now has {len(self.records)}; the order would differ")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.counter.load_state_dict(state["counter"])

    def close(self) -> None:
        if self.counter.seen:
            logger.info("training images: %s", self.summary())
