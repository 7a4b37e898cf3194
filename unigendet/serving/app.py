"""The HTTP service over any image detector (``score(images, questions)``, ``describe()``): a FastAPI app.

Endpoints:

* ``GET /health``: 200 ``{"status": "ok", ...}`` while serving, 503 once shutting down.
* ``GET /info``: the detector's name, ``describe()`` (with its weights fingerprint where it has one), its
  thresholds, the limits and the batching settings.
* ``POST /detect``: images as multipart file parts or JSON ``{"images": [{"id": ..., "data": <base64>}]}``;
  answers ``{"results": [record + "id", ...]}`` in the request's order, ``record`` being the result's
  ``record()``; with ``?spectral_map=1``, a result that carries a spectral map also gets ``spectral_map_png``
  (a base64 PNG, the map scaled to 0-255).
* ``GET /metrics``: Prometheus text. ``GET /``: the web page (``static/``).

Errors are JSON ``{"error": <code>, "message": <text>[, "image": <id>]}``: 400 malformed JSON / multipart or bad
base64, 413 over a size, count or pixel limit, 415 another content type, 422 a missing or invalid field or a
file that is not a readable image, 500 the detector raised (the service goes on), 503 queue full or shutting
down, 504 not answered within the request timeout. Every request is logged as one JSON line on the
``unigendet.serving.access`` logger.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from unigendet.detectors.spectral import spectral_map_image
from unigendet.labels import DetectionResult
from unigendet.metrics import jsonable
from unigendet.serving.batching import DetectorFailed, DynamicBatcher, QueueFull, ShuttingDown
from unigendet.serving.config import BatchingConfig, LimitsConfig
from unigendet.serving.inputs import RequestError, decode_images, encoded_images, read_body
from unigendet.serving.metrics import ServiceMetrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("unigendet.serving.access")

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(detector, name: str, batching: BatchingConfig | None = None, limits: LimitsConfig | None = None,
               question: str | None = None, weights_fingerprint: str | None = None) -> FastAPI:
    """The service over ``detector`` (shown as ``name``; ``weights_fingerprint`` for /info, default the ``weights``
    its ``describe()`` names). The batching worker starts and stops with the app's lifespan: at shutdown it
    scores every queued image before the app exits."""
    batching = batching or BatchingConfig()
    limits = limits or LimitsConfig()
    state: dict[str, Any] = {}

    def queue_depth() -> float:
        batcher = state.get("batcher")
        return 0 if batcher is None else batcher.depth

    metrics = ServiceMetrics(queue_depth)
    info = _info(detector, name, batching, limits, weights_fingerprint)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher = DynamicBatcher(detector, batching.max_batch_size, batching.max_wait_ms / 1000,
                                 batching.queue_size, on_batch=metrics.observe_batch)
        batcher.start()
        state["batcher"] = batcher
        logger.info("serving %s (max_batch_size=%d, max_wait_ms=%g, queue_size=%d)", name,
                    batching.max_batch_size, batching.max_wait_ms, batching.queue_size)
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)
            logger.info("batching worker stopped; every queued image was scored")

    app = FastAPI(title="unigendet", summary="AI-generated image detection", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN; /openapi.json stays
    app.add_middleware(AccessLog, metrics=metrics)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        batcher = state.get("batcher")
        if batcher is None or batcher.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "detector": name, "queue_depth": batcher.depth})

    @app.get("/info")
    async def model_info() -> JSONResponse:
        return JSONResponse(info)

    @app.post("/detect")
    async def detect(request: Request, spectral_map: bool = False) -> JSONResponse:
        body = await read_body(request, limits.max_request_bytes)
        encoded = await encoded_images(request.headers, body, limits)
        request.state.images = len(encoded)
        images = await run_in_threadpool(decode_images, encoded, limits)
        results = await _scored(state["batcher"], images, question, limits.request_timeout_s)
        metrics.observe_results(results)
        records = await run_in_threadpool(_records, [e.id for e in encoded], results, spectral_map)
        return JSONResponse({"results": records})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _scored(batcher: DynamicBatcher, images: Sequence[Image.Image], question: str | None,
                  timeout_s: float) -> list[DetectionResult]:
    """The images' results through the batching queue; 503 when it is full, 504 past the timeout, 500 when the
    detector failed."""
    try:
        futures = batcher.submit(images, [question] * len(images))
    except QueueFull as err:
        raise RequestError(503, "queue_full", str(err)) from None
    except ShuttingDown as err:
        raise RequestError(503, "shutting_down", str(err)) from None
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), timeout_s))
    except asyncio.TimeoutError:
        for future in futures:
            future.cancel()  # images not yet in a batch are dropped
        raise RequestError(504, "timeout", f"not answered within limits.request_timeout_s={timeout_s:g} s") from None
    except DetectorFailed as err:
        raise RequestError(500, "detector_error", str(err)) from None


def _records(ids: list[str], results: list[DetectionResult], with_map: bool) -> list[dict[str, Any]]:
    records = []
    for image_id, result in zip(ids, results):
        record = {"id": image_id, **jsonable(result.record())}
        values = getattr(result, "spectral_map", None)
        if with_map and values is not None:
            record["spectral_map_png"] = spectral_map_png(values)
        records.append(record)
    return records


def spectral_map_png(values) -> str:
    """A 2-D map (tensor or array) as a base64 grey PNG, its finite range scaled to 0-255 (flat: all 0)."""
    buffer = io.BytesIO()
    spectral_map_image(values).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _info(detector, name: str, batching: BatchingConfig, limits: LimitsConfig,
          weights_fingerprint: str | None) -> dict[str, Any]:
    """What /info answers; ``fingerprint`` digests the whole description (settings and weights)."""
    described = jsonable(detector.describe())
    if weights_fingerprint is None and isinstance(described, dict):
        weights_fingerprint = described.get("weights")
    digest = hashlib.blake2b(json.dumps([described, weights_fingerprint], sort_keys=True).encode(),
                             digest_size=16).hexdigest()
    return {"detector": name, "describe": described, "weights_fingerprint": weights_fingerprint,
            "fingerprint": digest, "thresholds": _thresholds(detector, described),
            "batching": asdict(batching), "limits": asdict(limits)}


def _thresholds(detector, described: Any) -> Any:
    """The detector's ``thresholds`` (a mapping or dataclass) when it has them, else the ``threshold`` its
    description names (a baseline's p(fake) cut), else None."""
    thresholds = getattr(detector, "thresholds", None)
    if callable(thresholds):
        thresholds = thresholds()
    if is_dataclass(thresholds) and not isinstance(thresholds, type):
        return jsonable(asdict(thresholds))
    if isinstance(thresholds, dict):
        return jsonable(thresholds)
    if isinstance(described, dict) and "threshold" in described:
        return {"p_fake": described["threshold"]}
    return None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        if err.status >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, err.message)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"error": "invalid_parameter", "message": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, f"http_{err.status_code}")
        return JSONResponse({"error": code, "message": str(err.detail)}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse({"error": "internal_error", "message": f"{type(err).__name__}: {err}"}, status_code=500)


class AccessLog:
    """ASGI middleware: one JSON line per HTTP request (method, path, status, ms, images, client) on the
    ``unigendet.serving.access`` logger, and the request counters and latency histogram."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe_request(scope["path"], status, seconds)
            client = scope.get("client")
            access_logger.info(json.dumps({
                "method": scope["method"], "path": scope["path"], "status": status, "ms": round(seconds * 1000, 2),
                "images": scope.get("state", {}).get("images"), "client": f"{client[0]}:{client[1]}" if client else None,
            }))
