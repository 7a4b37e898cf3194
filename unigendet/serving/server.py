"""Running the service: ``unigendet serve`` (uvicorn in the foreground, graceful on SIGTERM / SIGINT) and
:class:`BackgroundServer` (uvicorn in a thread on loopback, for tests and benchmarks).

On SIGTERM or SIGINT uvicorn stops accepting connections and waits for the requests in flight (up to
``server.graceful_timeout_s`` when set); then the app's lifespan ends, which lets the batching worker score
everything still queued. Only then does the process exit.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from unigendet.evaluation.detectors import load_image_detector
from unigendet.serving.app import create_app
from unigendet.serving.config import ServeConfig
from unigendet.utils.errors import RunError
from unigendet.utils.fingerprint import weights_fingerprint

logger = logging.getLogger(__name__)


def load_served_detector(cfg: ServeConfig):
    """The detector ``cfg.model`` names, loaded as the scoring commands load it."""
    return load_image_detector(cfg.model, cfg.detector, max_new_tokens=cfg.max_new_tokens, decoding=cfg.decoding,
                               seed=cfg.seed, batch_size=cfg.batching.max_batch_size)


def uvicorn_config(app, host: str, port: int, graceful_timeout_s: float | None = None) -> uvicorn.Config:
    """uvicorn settings: our logging (no uvicorn log config), our access log instead of uvicorn's."""
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=graceful_timeout_s)


def served_weights_fingerprint(cfg: ServeConfig) -> str | None:
    """UniGenDet's weights fingerprint (sha256 of its weight files, and of the ``weights`` override when given);
    None for the other detectors, whose ``describe()`` carries their own."""
    if not cfg.model.is_unigendet:
        return None
    digests = [weights_fingerprint(cfg.model.path), weights_fingerprint(cfg.model.weights)]
    if digests[1] is None:
        return digests[0]
    return hashlib.sha256(" ".join(str(d) for d in digests).encode()).hexdigest()


def run_serve_command(cfg: ServeConfig) -> None:
    detector = load_served_detector(cfg)
    app = create_app(detector, cfg.model.detector, cfg.batching, cfg.limits, cfg.question,
                     weights_fingerprint=served_weights_fingerprint(cfg))
    server = uvicorn.Server(uvicorn_config(app, cfg.server.host, cfg.server.port, cfg.server.graceful_timeout_s))
    with _stop_signals_end_cleanly() as received:
        server.run()
    if received:
        logger.info("stopped by %s after a graceful shutdown", received[-1].name)
    if not server.started:
        raise RunError(f"the service did not start on {cfg.server.host}:{cfg.server.port} (see the log above)")


@contextmanager
def _stop_signals_end_cleanly() -> Iterator[list[signal.Signals]]:
    """While serving, SIGINT / SIGTERM only start uvicorn's graceful shutdown. uvicorn then re-sends the signal
    to the handler that was installed before it; this one notes it (yielded list) instead of killing the process
    or raising KeyboardInterrupt, so a drained shutdown ends the command normally (exit 0)."""
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda number, _: received.append(signal.Signals(number))) for sig in stops}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` on ``host`` (any free port by default) in a
    thread; ``server.url`` is its address. Leaving the block shuts it down gracefully and joins the thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0):
        self.server = uvicorn.Server(uvicorn_config(app, host, port))
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self._thread = threading.Thread(target=self.server.run, name="unigendet-serve", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(self.startup_timeout_s)
