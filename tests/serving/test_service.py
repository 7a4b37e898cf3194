"""``unigendet serve``'s app through a real HTTP client against uvicorn on loopback: results, batching, limits,
refusals, metrics and logs."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_data import Wrapped, image_set, load_spectral, png_bytes, png_header_bomb, serving

from unigendet.serving.app import spectral_map_png


def files(*images: Image.Image, prefix: str = "img") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{prefix}{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]


def as_json(*images: Image.Image) -> dict:
    return {"images": [{"id": f"j{i}", "data": base64.b64encode(png_bytes(im)).decode()} for i, im in enumerate(images)]}


def expected(detector, ids, images) -> list[dict]:
    return [{"id": i, **r.record()} for i, r in zip(ids, detector.score(images))]


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Equal records; p(fake) to float32 rounding (a batch of other requests' images can change the last bits of
    the detector's matrix products)."""
    assert [{**r, "p_fake": None} for r in got] == [{**r, "p_fake": None} for r in want]
    assert [r["p_fake"] for r in got] == pytest.approx([r["p_fake"] for r in want], abs=1e-6)


def test_detect_answers_what_the_in_process_detector_says(spectral_dir):
    detector = load_spectral(spectral_dir)
    images = image_set(5, seed=1)
    with serving(detector) as url:
        multipart = httpx.post(f"{url}/detect", files=files(*images[:3]), timeout=30)
        posted = httpx.post(f"{url}/detect", json=as_json(*images[3:]), timeout=30)
    assert multipart.status_code == 200 and posted.status_code == 200
    assert_same_records(multipart.json()["results"], expected(detector, ["img0.png", "img1.png", "img2.png"],
                                                             images[:3]))
    assert_same_records(posted.json()["results"], expected(detector, ["j0", "j1"], images[3:]))
    assert {r["label"] for r in multipart.json()["results"] + posted.json()["results"]} == {"real", "fake"}


def test_concurrent_requests_are_batched_and_equal_one_by_one_scoring(spectral_dir):
    inner = load_spectral(spectral_dir)
    detector = Wrapped(inner, delay=0.05)
    images = image_set(12, seed=2)
    with serving(detector, batching={"max_batch_size": 8, "max_wait_ms": 20}) as url:
        def one(i: int) -> dict:
            return httpx.post(f"{url}/detect", files=files(images[i], prefix=f"c{i}-"), timeout=30).json()

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(12)))
        metrics = httpx.get(f"{url}/metrics").text
    assert sum(detector.batch_sizes) == 12 and max(detector.batch_sizes) > 1
    assert max(detector.batch_sizes) <= 8
    alone = [{"id": f"c{i}-0.png", **inner.score([images[i]])[0].record()} for i in range(12)]
    assert_same_records([a["results"][0] for a in answers], alone)
    assert f"unigendet_batch_size_count {float(len(detector.batch_sizes))}" in metrics
    assert "unigendet_images_scored_total 12.0" in metrics


BAD_INPUTS = [  # (what, request keyword arguments, status, error code, words the message must contain)
    ("body over max_request_bytes", {"files": [("files", ("big.png", b"\0" * 300_000, "image/png"))]},
     413, "request_too_large", "limits.max_request_bytes"),
    ("too many images", {"files": files(*image_set(5))}, 413, "too_many_images", "limits.max_images_per_request"),
    ("pixel count over max_pixels", {"files": files(Image.new("RGB", (400, 400)))}, 413, "image_too_large",
     "limits.max_pixels"),
    ("decompression bomb", {"files": [("files", ("bomb.png", png_header_bomb(40000, 40000), "image/png"))]},
     413, "image_too_large", "1600000000 pixels"),
    ("not an image", {"files": [("files", ("notes.txt", b"hello, world", "text/plain"))]}, 422,
     "unreadable_image", "notes.txt"),
    ("truncated image", {"files": [("files", ("cut.png", png_bytes(image_set(1)[0])[:120], "image/png"))]}, 422,
     "unreadable_image", "cut.png"),
    ("malformed JSON", {"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 400,
     "malformed_json", "not valid JSON"),
    ("bad base64", {"json": {"images": [{"id": "b", "data": "not*base64"}]}}, 400, "bad_base64", "images[0].data"),
    ("missing images", {"json": {"pictures": []}}, 422, "missing_field", "images"),
    ("missing data", {"json": {"images": [{"id": "x"}]}}, 422, "missing_field", "images[0].data"),
    ("images not a list", {"json": {"images": "abc"}}, 422, "invalid_field", "list"),
    ("no image", {"json": {"images": []}}, 422, "no_images", "no image"),
    ("other content type", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type", "text/plain"),
    ("malformed multipart", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}},
     400, "malformed_multipart", "multipart"),
]


@pytest.fixture(scope="module")
def limited_service(tmp_path_factory):
    from serving_data import save_tiny_spectral

    detector = load_spectral(save_tiny_spectral(tmp_path_factory.mktemp("limited")))
    limits = {"max_request_bytes": 200_000, "max_image_bytes": 100_000, "max_images_per_request": 4,
              "max_pixels": 100_000}
    with serving(detector, limits=limits) as url:
        yield url


@pytest.mark.parametrize("what, request_kwargs, status, code, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_status_and_the_service_keeps_answering(limited_service, what, request_kwargs, status,
                                                                   code, words):
    response = httpx.post(f"{limited_service}/detect", timeout=30, **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and words in body["message"], body
    assert httpx.get(f"{limited_service}/health").json()["status"] == "ok"
    good = httpx.post(f"{limited_service}/detect", files=files(image_set(1)[0]), timeout=30)
    assert good.status_code == 200 and good.json()["results"][0]["label"] in ("real", "fake")


def test_a_bad_query_parameter_and_unknown_paths_get_json_errors(limited_service):
    response = httpx.post(f"{limited_service}/detect?spectral_map=maybe", files=files(image_set(1)[0]))
    assert response.status_code == 422 and response.json()["error"] == "invalid_parameter"
    assert "spectral_map" in response.json()["message"]
    assert httpx.get(f"{limited_service}/nowhere").json()["error"] == "not_found"
    assert httpx.get(f"{limited_service}/detect").status_code == 405


def test_a_full_queue_gives_503_and_queued_requests_still_finish(spectral_dir):
    gate = threading.Event()
    detector = Wrapped(load_spectral(spectral_dir), gate=gate)
    image = image_set(1)[0]
    with serving(detector, batching={"max_batch_size": 1, "max_wait_ms": 0, "queue_size": 2},
                 limits={"max_images_per_request": 2}) as url:
        post = lambda: httpx.post(f"{url}/detect", files=files(image), timeout=30)  # noqa: E731
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(post)
            assert detector.entered.wait(10)  # the worker holds the first image
            queued = [pool.submit(post) for _ in range(2)]
            wait_for(lambda: httpx.get(f"{url}/health").json()["queue_depth"] == 2)
            refused = post()
            gate.set()
            answers = [running.result(), *(q.result() for q in queued)]
        assert refused.status_code == 503 and refused.json()["error"] == "queue_full"
        assert "queue is full" in refused.json()["message"]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert post().status_code == 200


def test_a_request_not_answered_in_time_gets_504(spectral_dir):
    gate = threading.Event()
    detector = Wrapped(load_spectral(spectral_dir), gate=gate)
    with serving(detector, limits={"request_timeout_s": 0.3}) as url:
        response = httpx.post(f"{url}/detect", files=files(image_set(1)[0]), timeout=30)
        gate.set()
        assert response.status_code == 504 and "limits.request_timeout_s" in response.json()["message"]
        assert httpx.post(f"{url}/detect", files=files(image_set(1)[0]), timeout=30).status_code == 200


def test_a_detector_exception_gives_500_for_that_request_only(spectral_dir, caplog):
    detector = Wrapped(load_spectral(spectral_dir), fail_on=lambda image: image.width == 33)
    with serving(detector) as url, caplog.at_level(logging.ERROR, "unigendet.serving"):
        failed = httpx.post(f"{url}/detect", files=files(Image.new("RGB", (33, 32))), timeout=30)
        assert failed.status_code == 500 and failed.json()["error"] == "detector_error"
        assert "cannot score such an image" in failed.json()["message"]
        assert httpx.post(f"{url}/detect", files=files(image_set(1)[0]), timeout=30).status_code == 200
    assert any("detector failed" in r.getMessage() for r in caplog.records)


def test_info_health_metrics_stage_counts_and_spectral_maps(spectral_dir):
    inner = load_spectral(spectral_dir)
    detector = Wrapped(inner, staged=True)
    images = image_set(3, seed=4)
    with serving(detector, name="cascade", batching={"max_batch_size": 4}) as url:
        info = httpx.get(f"{url}/info").json()
        health = httpx.get(f"{url}/health")
        plain = httpx.post(f"{url}/detect", files=files(*images), timeout=30).json()["results"]
        mapped = httpx.post(f"{url}/detect?spectral_map=1", files=files(*images), timeout=30).json()["results"]
        metrics = httpx.get(f"{url}/metrics")
    assert info["detector"] == "cascade" and info["weights_fingerprint"] == inner.describe()["weights"]
    assert info["describe"] == json.loads(json.dumps(inner.describe()))
    assert info["thresholds"] == {"p_fake": 0.5} and info["batching"]["max_batch_size"] == 4
    assert info["limits"]["max_pixels"] > 0
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert all("spectral_map_png" not in r for r in plain)
    assert [r["stage_exited"] for r in plain] == ["binary", "spectral", "mllm"]
    png = Image.open(io.BytesIO(base64.b64decode(mapped[0]["spectral_map_png"])))
    assert png.size == (4, 3) and png.getpixel((0, 0)) == 0 and png.getpixel((3, 2)) == 255
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    for line in ('unigendet_stage_exited_total{stage="binary"} 2.0', 'unigendet_stage_reached_total{stage="binary"} 6.0',
                 'unigendet_stage_reached_total{stage="spectral"} 4.0', 'unigendet_stage_reached_total{stage="mllm"} 2.0',
                 'unigendet_requests_total{path="/detect",status="200"} 2.0', "unigendet_queue_depth 0.0",
                 'unigendet_request_seconds_count{path="/detect"} 2.0'):
        assert line in text, line
    assert "unigendet_decisions_total" in text


def test_spectral_map_png_scales_the_finite_range():
    import torch

    values = torch.tensor([[0.0, 1.0], [2.0, float("nan")]])
    image = Image.open(io.BytesIO(base64.b64decode(spectral_map_png(values))))
    assert np.asarray(image).ravel().tolist() == [0, 128, 255, 0]


def test_every_request_is_one_json_access_log_line(spectral_dir, caplog):
    with serving(load_spectral(spectral_dir)) as url, caplog.at_level(logging.INFO, "unigendet.serving.access"):
        httpx.post(f"{url}/detect", files=files(*image_set(2)), timeout=30)
        httpx.get(f"{url}/health")
        # The line is written once the response is sent, so it may come a moment after the client has it.
        wait_for(lambda: sum(r.name == "unigendet.serving.access" for r in caplog.records) >= 2)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "unigendet.serving.access"]
    detect = next(line for line in lines if line["path"] == "/detect")
    assert detect["method"] == "POST" and detect["status"] == 200 and detect["images"] == 2
    assert detect["ms"] > 0 and detect["client"].startswith("127.0.0.1:")
    assert any(line["path"] == "/health" and line["images"] is None for line in lines)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_json_images_take_data_urls_and_default_ids(limited_service):
    data = base64.b64encode(png_bytes(image_set(1)[0])).decode()
    response = httpx.post(f"{limited_service}/detect", json={"images": [{"data": data},
                                                                        {"data": f"data:image/png;base64,{data}"}]})
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert (first["id"], second["id"]) == ("0", "1") and first["p_fake"] == second["p_fake"]
