"""``unigendet serve``'s settings: defaults, the short flags, and one-line errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from unigendet.cli import main


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch):
    """``main`` would point the root logger at this test's captured stderr, which is closed after the test while
    later tests' servers still log."""
    monkeypatch.setattr("unigendet.utils.logging.setup_logging", lambda *args, **kwargs: None)


def test_short_flags_set_the_serve_keys(spectral_dir, capsys):
    argv = ["serve", "--detector", "spectral", "--model", str(spectral_dir), "--port", "9123", "--max-batch-size",
            "4", "--max-wait-ms", "2.5", "--queue-size", "32", "--max-images", "8", "--max-pixels", "1000",
            "--request-timeout-s", "5", "limits.max_request_bytes=50000000", "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == {**printed["model"], "detector": "spectral", "path": str(spectral_dir)}
    assert printed["server"]["port"] == 9123 and printed["server"]["host"] == "127.0.0.1"
    assert printed["batching"] == {"max_batch_size": 4, "max_wait_ms": 2.5, "queue_size": 32}
    assert printed["limits"]["max_images_per_request"] == 8 and printed["limits"]["max_pixels"] == 1000
    assert printed["limits"]["request_timeout_s"] == 5 and printed["limits"]["max_request_bytes"] == 50_000_000


def test_dry_run_checks_the_detector_directory_without_serving(spectral_dir, capsys):
    assert main(["serve", "--detector", "spectral", "--model", str(spectral_dir), "--dry-run"]) == 0
    assert "config valid, inputs found" in capsys.readouterr().out


@pytest.mark.parametrize("words, key", [
    (["--port", "70000"], "server.port"),
    (["--max-batch-size", "0"], "batching.max_batch_size"),
    (["--max-wait-ms", "-1"], "batching.max_wait_ms"),
    (["--queue-size", "4"], "batching.queue_size"),
    (["--request-timeout-s", "0"], "limits.request_timeout_s"),
    (["--max-pixels", "0"], "limits.max_pixels"),
    (["limits.max_image_bytes=99999999999"], "limits.max_request_bytes"),
    (["server.host="], "server.host"),
    (["--detector", "ltd"], "model.detector"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(spectral_dir, capsys, words, key):
    base = ["serve", "--detector", "spectral", "--model", str(spectral_dir)]
    assert main([*base, *words, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unigendet: error:") and key in err and len(err.splitlines()) == 1


def test_info_fingerprints_unigendet_weights_by_their_bytes(spectral_dir, tmp_path, monkeypatch):
    import hashlib

    from unigendet.config.loader import from_dict
    from unigendet.serving.config import ServeConfig
    from unigendet.serving.server import served_weights_fingerprint

    monkeypatch.setenv("UNIGENDET_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    ours = from_dict(ServeConfig, {"model": {"path": str(tmp_path / "model")}})
    assert served_weights_fingerprint(ours) == hashlib.sha256(b"weights").hexdigest()
    baseline = from_dict(ServeConfig, {"model": {"path": str(spectral_dir), "detector": "spectral"}})
    assert served_weights_fingerprint(baseline) is None  # a baseline's describe() carries its own
