"""ShardedStream: exact per-epoch coverage across ranks x workers, fresh epochs, bad samples, resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from unigendet.data.packing import PlanSample
from unigendet.data.quality import BadSample, DataQualityError
from unigendet.data.sharding import ShardedStream, epoch_permutation, worker_shard_info


class FakeSource:
    """In-memory source: record i loads as a sample keyed str(i); indices in ``bad`` are bad."""

    def __init__(self, n: int, bad=(), reason="unreadable_image"):
        self.n, self.bad, self.reason = n, set(bad), reason
        self.name = "fake"

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> PlanSample:
        if index in self.bad:
            raise BadSample(self.reason, f"record {index}")
        return PlanSample(items=[], num_tokens=1, kind="fake", key=str(index))


def single(source, **kw) -> ShardedStream:
    """The only shard of ``source`` (one rank, one worker)."""
    return ShardedStream(source, seed=0, worker_id=0, num_workers=1, **kw)


def keys(stream, n: int) -> list[int]:
    return [int(s.key) for s in itertools.islice(stream, n)]


@pytest.mark.parametrize("n", [23, 64])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (1, 3), (2, 3), (3, 2), (4, 4)])
def test_each_epoch_is_covered_exactly_once(n, world, workers):
    for epoch in range(2):
        seen = []
        for rank, worker in itertools.product(range(world), range(workers)):
            stream = ShardedStream(
                FakeSource(n), seed=7, rank=rank, world_size=world, worker_id=worker, num_workers=workers
            )
            keys(stream, epoch * stream.shard_size)  # skip earlier epochs
            seen += keys(stream, stream.shard_size)
            assert stream.epoch == epoch  # exactly one epoch's share was taken
        assert sorted(seen) == list(range(n))  # no duplicates, no gaps


def test_epochs_use_different_orders():
    stream = ShardedStream(FakeSource(50), seed=1, worker_id=0, num_workers=1)
    first, second = keys(stream, 50), keys(stream, 50)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    assert torch.equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 3))
    other_seed = ShardedStream(FakeSource(50), seed=2, worker_id=0, num_workers=1)
    assert keys(other_seed, 50) != first


def test_last_index_names_the_returned_record():
    stream = single(FakeSource(9, bad={2}), max_bad_fraction=0.5)
    assert stream.last_index is None
    for sample in itertools.islice(stream, 12):
        assert stream.last_index == int(sample.key)


def test_too_few_records_for_the_shards():
    stream = ShardedStream(FakeSource(3), seed=0, world_size=2, worker_id=0, num_workers=2)
    with pytest.raises(ValueError, match="3 records, fewer than the 4 shards"):
        next(stream)


def test_bad_samples_are_skipped_and_counted():
    stream = single(FakeSource(20, bad={3, 7}), max_bad_fraction=0.5, min_seen=1)
    got = keys(stream, 36)  # two epochs' worth of good records
    assert 3 not in got and 7 not in got and sorted(got) == sorted([i for i in range(20) if i not in (3, 7)] * 2)
    assert stream.counter.good == 36 and stream.counter.bad == {"unreadable_image": 4}


def test_data_quality_error_above_threshold():
    stream = single(FakeSource(40, bad=range(0, 40, 2)), max_bad_fraction=0.2, min_seen=10)
    with pytest.raises(DataQualityError, match="unreadable_image=") as err:
        keys(stream, 40)
    assert stream.counter.seen >= 10 and "fake" in str(err.value)
    # A tolerant threshold lets the same data through.
    keys(single(FakeSource(40, bad=range(0, 40, 2)), max_bad_fraction=0.6), 40)


def test_all_bad_shard_stops_instead_of_spinning():
    stream = single(FakeSource(8, bad=range(8)), max_bad_fraction=1.0)
    with pytest.raises(DataQualityError, match="no loadable record in a whole epoch"):
        next(stream)


@pytest.mark.parametrize("stop", [0, 5, 17, 33])
def test_resume_continues_identically(stop):
    def make():
        return ShardedStream(
            FakeSource(17, bad={4}), seed=9, rank=1, world_size=2, worker_id=1, num_workers=2, max_bad_fraction=0.5
        )

    reference = make()
    expected = keys(reference, stop + 25)
    interrupted = make()
    assert keys(interrupted, stop) == expected[:stop]
    state = json.loads(json.dumps(interrupted.state_dict()))  # checkpoints store plain JSON types
    resumed = make()
    resumed.load_state_dict(state)
    assert keys(resumed, 25) == expected[stop:]
    assert resumed.state_dict() == reference.state_dict()  # the counter travels too


def test_resume_rejects_a_different_sharding():
    stream = ShardedStream(FakeSource(10), seed=0, worker_id=0, num_workers=2)
    keys(stream, 3)
    state = stream.state_dict()
    other = ShardedStream(FakeSource(10), seed=0, worker_id=1, num_workers=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="shard 0 of 2"):
        next(other)
    with pytest.raises(ValueError, match="11"):
        ShardedStream(FakeSource(11), seed=0, worker_id=0, num_workers=2).load_state_dict(state)


def test_worker_shard_info_in_main_process():
    assert worker_shard_info() == (0, 1)


class _StreamDataset(IterableDataset):
    def __init__(self, stream: ShardedStream, per_worker: int):
        self.stream, self.per_worker = stream, per_worker

    def __iter__(self):
        yield from keys(self.stream, self.per_worker)


def test_dataloader_workers_take_disjoint_shards():
    stream = ShardedStream(FakeSource(12), seed=3)  # worker id resolved inside each worker
    # Touching the stream in the main process must not pin the copies in the workers to shard (0, 1).
    assert stream.shard == (0, 1) and stream.state_dict()["shard"] == [0, 1]
    dataset = _StreamDataset(stream, per_worker=6)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert sorted(int(k) for k in loader) == list(range(12))
