"""Dynamic batching: images of concurrent requests scored together by one worker thread.

Requests put their images in a bounded queue (:meth:`DynamicBatcher.submit` returns one future per image). A
single worker thread owns the detector: it takes the first waiting image, then keeps collecting until the batch
holds ``max_batch_size`` images or ``max_wait_s`` has passed since that image arrived, and scores the batch with
one ``detector.score`` call. Running the model in a thread keeps the server's event loop free to accept and
refuse requests meanwhile.

A batch whose scoring raises is scored again one image at a time, so one image the detector cannot handle fails
only its own request; that image's future carries :class:`DetectorFailed`. :meth:`DynamicBatcher.close` refuses
new work, lets the worker score everything already queued, and joins it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from PIL import Image

from unigendet.labels import DetectionResult

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue cannot take a request's images now (the service answers 503)."""


class ShuttingDown(RuntimeError):
    """The batcher is closing and takes no new work (the service answers 503)."""


class DetectorFailed(RuntimeError):
    """The detector raised while scoring an image; the message names the exception."""


@dataclass
class _Item:
    image: Image.Image
    question: str | None
    future: Future
    queued_at: float  # time.monotonic() when it entered the queue


BatchObserver = Callable[[int, float], None]  # (images in the batch, seconds the score call took)


class DynamicBatcher:
    """One worker thread scoring queued images with ``detector.score`` in batches (see the module docstring)."""

    def __init__(self, detector, max_batch_size: int = 8, max_wait_s: float = 0.005, queue_size: int = 64,
                 on_batch: BatchObserver | None = None):
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, queue_size >= 1, max_wait_s >= 0; got {max_batch_size}, "
                             f"{queue_size}, {max_wait_s}")
        self.detector = detector
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._work, name="unigendet-batcher", daemon=True)

    # ------------------------------------------------------------------------------------------ caller side
    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        """Images waiting in the queue (not yet taken into a batch)."""
        return len(self._pending)

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, images: Sequence[Image.Image], questions: Sequence[str | None] | None = None) -> list[Future]:
        """Queue ``images`` (all or none); one future per image, resolved with its DetectionResult."""
        questions = list(questions) if questions is not None else [None] * len(images)
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        now = time.monotonic()
        items = [_Item(image, question, Future(), now) for image, question in zip(images, questions)]
        with self._ready:
            if self._closing:
                raise ShuttingDown("the service is shutting down")
            if len(self._pending) + len(items) > self.queue_size:
                raise QueueFull(f"the queue is full ({len(self._pending)} of {self.queue_size} images waiting); "
                                "retry later")
            self._pending.extend(items)
            self._ready.notify()
        return [item.future for item in items]

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, score what is queued, stop the worker."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ worker side
    def _next_batch(self) -> list[_Item] | None:
        """The next batch (None once closing with nothing left), without the images whose request gave up."""
        with self._ready:
            while not self._pending and not self._closing:
                self._ready.wait()
            if not self._pending:
                return None
            # Counted from the oldest image's arrival: images that queued while the worker was busy do not wait
            # a second time.
            deadline = self._pending[0].queued_at + self.max_wait_s
            while len(self._pending) < self.max_batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            taken = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
        # A request that timed out cancelled its futures: its images are not scored.
        return [item for item in taken if item.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._score(batch)

    def _score(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            results = self._score_call(batch)
        except Exception as err:
            logger.exception("the detector failed on a batch of %d image(s)%s", len(batch),
                             "; scoring them one at a time" if len(batch) > 1 else "")
            results = self._score_alone(batch) if len(batch) > 1 else [_failed(err)]
        seconds = time.perf_counter() - start
        for item, result in zip(batch, results):
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)

    def _score_call(self, batch: list[_Item]) -> list[DetectionResult]:
        results = list(self.detector.score([item.image for item in batch], [item.question for item in batch]))
        if len(results) != len(batch):
            raise RuntimeError(f"the detector returned {len(results)} results for {len(batch)} images")
        return results

    def _score_alone(self, batch: list[_Item]) -> list[DetectionResult | DetectorFailed]:
        out: list[DetectionResult | DetectorFailed] = []
        for item in batch:
            try:
                out += self._score_call([item])
            except Exception as err:
                logger.exception("the detector failed on one image")
                out.append(_failed(err))
        return out


def _failed(err: Exception) -> DetectorFailed:
    return DetectorFailed(f"the detector failed: {type(err).__name__}: {err}")
