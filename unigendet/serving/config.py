"""``unigendet serve``'s settings: which detector to load, where to listen, how to batch, and what input to refuse.

:class:`ServeConfig` is composed of the detector source (the same :class:`DetectorSource` the scoring commands
read: ``model.detector`` and ``model.path``), UniGenDet's preprocessing and decoding choices, and three sections
of its own: :class:`ServerConfig` (address, graceful shutdown), :class:`BatchingConfig` (dynamic batching and the
bounded queue) and :class:`LimitsConfig` (request size, image count, pixel count, per-request timeout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_positive, require_range
from unigendet.evaluation.commands import check_detector_choice
from unigendet.evaluation.detectors import DetectorSource
from unigendet.inference.detect import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DecodingConfig
from unigendet.inference.loading import DetectorOptions


@dataclass
class ServerConfig:
    """Where the service listens and how long a graceful shutdown may take."""

    host: str = "127.0.0.1"  # loopback by default: exposing the service is an explicit choice
    port: int = 8000  # 0: any free port (logged at start-up)
    graceful_timeout_s: float | None = None  # after SIGTERM, stop waiting for in-flight requests after this long

    def validate(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty")
        require_range("port", self.port, 0, 65535)
        if self.graceful_timeout_s is not None:
            require_positive("graceful_timeout_s", self.graceful_timeout_s)


@dataclass
class BatchingConfig:
    """Concurrent requests' images are scored together: a batch is closed when it holds ``max_batch_size``
    images or ``max_wait_ms`` after its first image arrived. At most ``queue_size`` images wait; a request that
    does not fit is refused with 503."""

    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 64

    def validate(self) -> None:
        require_range("max_batch_size", self.max_batch_size, 1)
        require_non_negative("max_wait_ms", self.max_wait_ms)
        require_range("queue_size", self.queue_size, 1)


@dataclass
class LimitsConfig:
    """What a request may hold. Larger bodies, more images, larger encoded images or more pixels get 413, checked
    before decoding (the pixel count is read from the image header); a request not answered within
    ``request_timeout_s`` (queueing and scoring) gets 504."""

    max_request_bytes: int = 32 * 2**20
    max_images_per_request: int = 16
    max_image_bytes: int = 16 * 2**20
    max_pixels: int = 40_000_000
    request_timeout_s: float = 60.0

    def validate(self) -> None:
        for name in ("max_request_bytes", "max_images_per_request", "max_image_bytes", "max_pixels"):
            require_range(name, getattr(self, name), 1)
        require_positive("request_timeout_s", self.request_timeout_s)


@dataclass
class ServeConfig:
    """``serve``: an HTTP service scoring images with the detector ``model`` names (UniGenDet, a saved baseline
    or a saved cascade), with dynamic batching, input limits, metrics and a web page."""

    model: DetectorSource
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # UniGenDet's explanation length (0: head only)
    seed: int = DEFAULT_SEED
    question: str | None = None  # text after <image> in the human turn; default the detector's
    server: ServerConfig = field(default_factory=ServerConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def validate(self) -> None:
        check_detector_choice(self.model, self.detector)
        require_non_negative("max_new_tokens", self.max_new_tokens)
        if self.limits.max_images_per_request > self.batching.queue_size:
            raise ConfigError(f"limits.max_images_per_request ({self.limits.max_images_per_request}) must be <= "
                              f"batching.queue_size ({self.batching.queue_size}): a larger request could never "
                              "be queued")
        if self.limits.max_image_bytes > self.limits.max_request_bytes:
            raise ConfigError(f"limits.max_image_bytes ({self.limits.max_image_bytes}) must be <= "
                              f"limits.max_request_bytes ({self.limits.max_request_bytes})")

    def check_inputs(self) -> None:
        self.model.check_inputs()
