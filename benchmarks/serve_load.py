"""Load benchmark of ``unigendet serve``: the service on loopback with a tiny detector, driven by concurrent clients.

    python benchmarks/serve_load.py                       # tiny cascade (or spectral), 8 clients, 15 s, batch 1 and 8
    python benchmarks/serve_load.py --clients 16 --seconds 30 --batch-sizes 1 4 8
    python benchmarks/serve_load.py --detector spectral --model runs/spectral/final

For each max batch size the service is started as its own process (``python -m unigendet.cli serve``), warmed
up, then ``--clients`` clients each send one image per request, back to back, for ``--seconds``. Printed per
batch size: requests/s, latency percentiles (p50/p95/p99, ms), errors, the mean batch the worker scored (from
/metrics), and, when the results say which stage decided (a cascade), the share of images each stage decided.

Without ``--model`` a tiny detector is built in a temporary directory from synthetic images (plain noise as
"real", noise with a periodic 4-px grid as "fake"): the cascade's tiny recipe (``configs/cascade/tiny.yaml``: stub
verifier, default thresholds) over two fitted spectral detectors where the cascade package is available, else a
fitted spectral detector.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", default=None, help="with --model: its detector name (spectral, ltd, cascade, ...)")
    p.add_argument("--model", default=None, help="a saved detector directory (default: build a tiny one)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--distinct-images", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON line per batch size instead of a table")
    args = p.parse_args(argv)
    if (args.model is None) != (args.detector is None):
        p.error("--model and --detector go together")
    if args.clients < 1 or args.seconds <= 0:
        p.error("--clients must be >= 1 and --seconds > 0")
    return args


# ---------------------------------------------------------------------------------------------- tiny detector
def synthetic_image(rng: np.random.Generator, fake: bool, size: int) -> Image.Image:
    values = rng.normal(128, 20, (size, size))
    if fake:
        values[::4, :] += rng.uniform(10, 40)
    return Image.fromarray(values.clip(0, 255).astype(np.uint8)).convert("RGB")


def tiny_detector(directory: Path, size: int) -> tuple[str, Path]:
    """(detector name, saved directory): a tiny cascade when the cascade package exists, else a spectral detector."""
    from unigendet.config.loader import ConfigError, from_dict, load_yaml
    from unigendet.detectors.base import build_detector
    from unigendet.recipes import recipe_path

    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(32)]
    images = [synthetic_image(rng, bool(y), size) for y in labels]
    spectral = build_detector("spectral", {"max_side": size, "radial_bins": 16})
    spectral.fit(images, labels, steps=50)
    spectral.save_pretrained(directory / "spectral")
    try:
        from unigendet.cascade import CascadeConfig, save_cascade
        recipe = load_yaml(recipe_path("cascade/tiny.yaml"))["cascade"]
    except (ImportError, ConfigError):  # no cascade package, or no tiny recipe
        return "spectral", directory / "spectral"
    binary = build_detector("spectral", {"max_side": size, "radial_bins": 4, "init_seed": 3})
    binary.fit(images, labels, steps=30)
    binary.save_pretrained(directory / "binary")
    config = from_dict(CascadeConfig, {**recipe, "binary": str(directory / "binary"),
                                       "spectral": str(directory / "spectral")})
    save_cascade(directory / "cascade", config)
    return "cascade", directory / "cascade"


# ---------------------------------------------------------------------------------------------- the service
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(detector: str, model: Path, batch_size: int, max_wait_ms: float, clients: int):
    port = free_port()
    queue = max(64, 4 * clients)
    command = [sys.executable, "-m", "unigendet.cli", "--log-level", "WARNING", "serve", "--detector", detector,
               "--model", str(model), "--port", str(port), "--max-batch-size", str(batch_size),
               "--max-wait-ms", str(max_wait_ms), "--queue-size", str(queue)]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe nobody reads would stall the service
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the service exited with {process.returncode}: {log.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the service did not start within 120 s")


def stop_service(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------- the clients
async def drive(url: str, payloads: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` concurrent loops of one-image requests for ``seconds``: latencies, statuses, stages."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    stages: Counter = Counter()
    deadline = time.perf_counter() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        i = index
        while time.perf_counter() < deadline:
            data = payloads[i % len(payloads)]
            i += clients
            start = time.perf_counter()
            response = await http.post(f"{url}/detect", files={"files": (f"{i}.png", data, "image/png")})
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] += 1
            if response.status_code == 200:
                for result in response.json()["results"]:
                    if result.get("stage_exited") is not None:
                        stages[result["stage_exited"]] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - began
    return {"latencies": latencies, "statuses": statuses, "stages": stages, "elapsed": elapsed}


def run_one(detector: str, model: Path, batch_size: int, payloads: list[bytes], args) -> dict:
    process, url = start_service(detector, model, batch_size, args.max_wait_ms, args.clients)
    try:
        asyncio.run(drive(url, payloads, args.clients, args.warmup_seconds))
        before_sum_count = _batch_totals(url)
        run = asyncio.run(drive(url, payloads, args.clients, args.seconds))
        after_sum_count = _batch_totals(url)
    finally:
        stop_service(process)
    latencies = np.array(run["latencies"]) * 1000
    ok = run["statuses"].get(200, 0)
    batches = after_sum_count[1] - before_sum_count[1]
    images = sum(run["stages"].values())
    return {
        "max_batch_size": batch_size, "clients": args.clients, "seconds": round(run["elapsed"], 2),
        "requests": int(len(latencies)), "ok": ok, "errors": int(len(latencies) - ok),
        "requests_per_s": round(len(latencies) / run["elapsed"], 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1), "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "mean_batch": round((after_sum_count[0] - before_sum_count[0]) / batches, 2) if batches else None,
        "stage_share": {stage: round(n / images, 3) for stage, n in sorted(run["stages"].items(), key=_stage_order)}
        if images else None,
    }


def _stage_order(item: tuple[str, int]) -> tuple[int, str]:
    """A cascade's stages in the order images pass them; other names after, alphabetically."""
    order = ("binary", "spectral", "mllm")
    return (order.index(item[0]) if item[0] in order else len(order), item[0])


def _batch_totals(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    total = re.search(r"^unigendet_batch_size_sum (\S+)$", text, re.M)
    count = re.search(r"^unigendet_batch_size_count (\S+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rng = np.random.default_rng(1)
    payloads = []
    for i in range(args.distinct_images):
        buffer = io.BytesIO()
        synthetic_image(rng, bool(i % 2), args.image_size).save(buffer, format="PNG")
        payloads.append(buffer.getvalue())
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the service process: tiny tensors, no thread hand-offs
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            detector, model = tiny_detector(Path(tmp), args.image_size)
        else:
            detector, model = args.detector, Path(args.model)
        rows = [run_one(detector, model, size, payloads, args) for size in args.batch_sizes]
    if args.json:
        for row in rows:
            print(json.dumps({"detector": detector, **row}))
        return rows
    print(f"detector {detector}, {args.clients} clients, {args.seconds:g} s per setting, "
          f"{args.image_size}x{args.image_size} PNG, max_wait_ms {args.max_wait_ms:g}")
    print("| max batch | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch | stage share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["stage_share"].items()) if r["stage_share"] else "n/a"
        print(f"| {r['max_batch_size']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
              f"{r['errors']} | {r['mean_batch']} | {share} |")
    return rows


if __name__ == "__main__":
    main()
