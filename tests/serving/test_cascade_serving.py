"""``unigendet serve --detector cascade``: the saved tiered cascade, loaded through the command line's config as
the scoring commands load it, answers over HTTP what the in-process cascade says, spectral maps included."""

from __future__ import annotations

import base64
import math

import httpx
import pytest
from serving_data import noise_image, png_bytes, save_tiny_cascade

from unigendet.cascade import load_cascade
from unigendet.cli import COMMANDS
from unigendet.config.command_line import parse_command_line, prepare
from unigendet.serving.app import create_app, spectral_map_png
from unigendet.serving.server import BackgroundServer, load_served_detector

THRESHOLDS = {"t1_binary_min": 0.05, "t2_spectral": 0.9}  # tiny stages: some images end at each stage
FLOATS = ("p_fake", "final_score", "binary_score", "spectral_score", "mllm_confidence")


def comparable(record: dict) -> dict:
    """The record without its timings (they differ run to run) and with rounded scores (a batch of other images
    can change the last bits of a stage's matrix products)."""
    out = {k: v for k, v in record.items() if k != "latency_ms"}
    for key in FLOATS:
        if isinstance(out.get(key), float) and math.isfinite(out[key]):
            out[key] = pytest.approx(out[key], abs=1e-6)
    return out


def test_serve_cascade_answers_what_the_in_process_cascade_says(tmp_path):
    directory = save_tiny_cascade(tmp_path, THRESHOLDS)
    command = next(c for c in COMMANDS if c.name == "serve")
    cfg = prepare(command, parse_command_line(command, ["--detector", "cascade", "--model", str(directory),
                                                        "--max-batch-size", "4"]))
    images = [noise_image(i, grid=bool(i % 2)) for i in range(12)]
    expected = load_cascade(directory).score(images)
    assert {r.stage_exited for r in expected} == {"binary", "spectral", "mllm"}
    app = create_app(load_served_detector(cfg), cfg.model.detector, cfg.batching, cfg.limits, cfg.question)
    with BackgroundServer(app) as server:
        response = httpx.post(f"{server.url}/detect?spectral_map=1", timeout=60,
                              files=[("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)])
        info = httpx.get(f"{server.url}/info").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert response.status_code == 200, response.text
    got = response.json()["results"]
    for i, (answer, want) in enumerate(zip(got, expected, strict=True)):
        maps = answer.pop("spectral_map_png", None)
        assert answer.pop("id") == f"{i}.png"
        assert comparable(answer) == comparable(want.record())
        assert (maps is None) == (want.spectral_map is None)
        if maps is not None:
            assert base64.b64decode(maps) == base64.b64decode(spectral_map_png(want.spectral_map))
    assert info["detector"] == "cascade" and info["thresholds"]["t1_binary_min"] == 0.05
    exited = {stage: sum(r.stage_exited == stage for r in expected) for stage in ("binary", "spectral", "mllm")}
    assert f'unigendet_stage_exited_total{{stage="mllm"}} {float(exited["mllm"])}' in metrics
    assert f'unigendet_stage_reached_total{{stage="binary"}} {float(len(images))}' in metrics
