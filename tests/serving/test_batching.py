"""The batching worker on its own: batch limits, routing of results, the bounded queue, cancellation, failure
isolation and draining on close."""

from __future__ import annotations

import threading
import time

import pytest

from unigendet.labels import DetectionResult
from unigendet.serving.batching import DetectorFailed, DynamicBatcher, QueueFull, ShuttingDown


class Echo:
    """p(fake) = the image's value / 100, so each future's result says which image it was for."""

    def __init__(self, gate: threading.Event | None = None, fail_value: int | None = None):
        self.calls: list[list[int]] = []
        self.gate = gate
        self.fail_value = fail_value
        self.entered = threading.Event()

    def describe(self) -> dict:
        return {"detector": "echo"}

    def score(self, images, questions=None):
        self.calls.append(list(images))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_value in images:
            raise ValueError(f"cannot score {self.fail_value}")
        return [DetectionResult(p_fake=value / 100) for value in images]


def started(detector, **kwargs) -> DynamicBatcher:
    batcher = DynamicBatcher(detector, **kwargs)
    batcher.start()
    return batcher


def test_images_queued_together_are_scored_in_batches_of_at_most_max_batch_size():
    gate = threading.Event()
    detector = Echo(gate)
    batcher = started(detector, max_batch_size=3, max_wait_s=0.05, queue_size=16)
    first = batcher.submit([0])
    assert detector.entered.wait(5)
    later = batcher.submit([1, 2]) + batcher.submit([3, 4, 5, 6])
    gate.set()
    results = [f.result(5).p_fake for f in first + later]
    batcher.close()
    assert results == [v / 100 for v in range(7)]
    assert detector.calls == [[0], [1, 2, 3], [4, 5, 6]]


def test_a_batch_waits_at_most_max_wait_for_more_images():
    detector = Echo()
    batcher = started(detector, max_batch_size=8, max_wait_s=0.2)
    start = time.monotonic()
    (future,) = batcher.submit([7])
    assert future.result(5).p_fake == 0.07
    waited = time.monotonic() - start
    batcher.close()
    assert 0.15 <= waited < 2.0 and detector.calls == [[7]]


def test_the_queue_is_bounded_and_refuses_whole_requests():
    gate = threading.Event()
    detector = Echo(gate)
    batcher = started(detector, max_batch_size=1, max_wait_s=0, queue_size=3)
    batcher.submit([0])
    assert detector.entered.wait(5)
    batcher.submit([1, 2])
    with pytest.raises(QueueFull, match="queue is full"):
        batcher.submit([3, 4])
    assert batcher.depth == 2
    batcher.submit([3])
    gate.set()
    batcher.close()
    assert [c[0] for c in detector.calls] == [0, 1, 2, 3]


def test_cancelled_images_are_not_scored():
    gate = threading.Event()
    detector = Echo(gate)
    batcher = started(detector, max_batch_size=4, max_wait_s=0)
    batcher.submit([0])
    assert detector.entered.wait(5)
    dropped = batcher.submit([1, 2])
    kept = batcher.submit([3])
    for future in dropped:
        assert future.cancel()
    gate.set()
    assert kept[0].result(5).p_fake == 0.03
    batcher.close()
    assert detector.calls == [[0], [3]]


def test_an_image_the_detector_cannot_score_fails_alone():
    gate = threading.Event()
    detector = Echo(gate, fail_value=2)
    batcher = started(detector, max_batch_size=4, max_wait_s=0)
    batcher.submit([0])
    assert detector.entered.wait(5)
    futures = batcher.submit([1, 2, 3])
    gate.set()
    assert futures[0].result(5).p_fake == 0.01 and futures[2].result(5).p_fake == 0.03
    with pytest.raises(DetectorFailed, match="ValueError: cannot score 2"):
        futures[1].result(5)
    batcher.submit([4])[0].result(5)  # the worker is still running
    batcher.close()


def test_close_scores_everything_queued_then_refuses_new_work():
    gate = threading.Event()
    detector = Echo(gate)
    batcher = started(detector, max_batch_size=2, max_wait_s=0)
    futures = batcher.submit([0]) + batcher.submit([1, 2, 3])
    assert detector.entered.wait(5)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(ShuttingDown):
        batcher.submit([9])
    gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert [f.result(0).p_fake for f in futures] == [0.0, 0.01, 0.02, 0.03]
