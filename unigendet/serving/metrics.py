"""The service's Prometheus metrics, in a registry of their own (so several apps in one process do not collide).

Requests by path and status, request latency, batch sizes and scoring time, images scored and failed, the queue
depth, and, for detectors whose results say which stage decided (a tiered cascade: ``stage_exited``), how many
images each stage ended and how many reached it; results with a ``decision`` are counted by decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# A cascade's stages in the order an image passes them: an image that exited at a stage reached every earlier one.
STAGE_ORDER = ("binary", "spectral", "mllm")
# The paths with a label of their own; anything else is counted as "other", so scans cannot grow the label set.
KNOWN_PATHS = ("/", "/health", "/info", "/detect", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def path_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    return "/static" if path.startswith("/static/") else "other"


class ServiceMetrics:
    """The counters, histograms and gauges of one app; ``queue_depth`` is read at each scrape."""

    def __init__(self, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("unigendet_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=r)
        self.latency = Histogram("unigendet_request_seconds", "HTTP request latency by path", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("unigendet_batch_size", "images per detector call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("unigendet_batch_seconds", "duration of one detector call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("unigendet_images_scored", "images scored", registry=r)
        self.stage_exited = Counter("unigendet_stage_exited", "images whose decision was made at each stage",
                                    ["stage"], registry=r)
        self.stage_reached = Counter("unigendet_stage_reached", "images that reached each stage", ["stage"],
                                     registry=r)
        self.decisions = Counter("unigendet_decisions", "images by decision", ["decision"], registry=r)
        self.queue_depth = Gauge("unigendet_queue_depth", "images waiting for a batch", registry=r)
        self.queue_depth.set_function(queue_depth)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        label = path_label(path)
        self.requests.labels(label, str(status)).inc()
        self.latency.labels(label).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def observe_results(self, results: Sequence[object]) -> None:
        """Stage and decision counts of results that carry ``stage_exited`` / ``decision``."""
        for result in results:
            stage = getattr(result, "stage_exited", None)
            if stage is not None:
                self.stage_exited.labels(stage).inc()
                reached = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1] if stage in STAGE_ORDER else (stage,)
                for name in reached:
                    self.stage_reached.labels(name).inc()
            decision = getattr(result, "decision", None)
            if decision is not None:
                self.decisions.labels(str(getattr(decision, "value", decision))).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
