"""Graceful shutdown of ``unigendet serve`` as a process: after SIGTERM it takes no new connection, every request
already sent (scoring or queued) gets its answer, and the process exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving_data import image_set, png_bytes

# ``unigendet serve`` with each detector call slowed down, so requests are still in flight at SIGTERM.
LAUNCHER = textwrap.dedent("""
    import sys
    import time

    import unigendet.serving.server as server

    load = server.load_served_detector


    class Slow:
        def __init__(self, inner):
            self.inner = inner

        def describe(self):
            return self.inner.describe()

        def score(self, images, questions=None):
            time.sleep(0.4)
            return self.inner.score(images, questions)


    server.load_served_detector = lambda cfg: Slow(load(cfg))
    from unigendet.cli import main

    sys.exit(main(sys.argv[1:]))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.slow  # a server process: about 10 s on 2 busy cores, mostly its imports
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics are POSIX")
def test_sigterm_lets_in_flight_and_queued_requests_finish(spectral_dir, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, str(launcher), "serve", "--detector", "spectral", "--model", str(spectral_dir), "--port",
         str(port), "--max-batch-size", "1", "--max-wait-ms", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, timeout=60)
        image = png_bytes(image_set(1)[0])
        post = lambda: httpx.post(f"{url}/detect", files={"f": ("a.png", image, "image/png")}, timeout=30)  # noqa: E731
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(post) for _ in range(4)]
            # One image is being scored (0.4 s), three wait in the queue: all four requests are in flight.
            wait_until(lambda: httpx.get(f"{url}/health", timeout=1).json()["queue_depth"] == 3, timeout=10)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=1)
            answers = [p.result() for p in pending]
        assert [a.status_code for a in answers] == [200] * 4
        assert all(a.json()["results"][0]["id"] == "a.png" for a in answers)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "every queued image was scored" in err and "stopped by SIGTERM" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
