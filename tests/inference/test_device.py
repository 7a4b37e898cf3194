"""Which device a command runs on: each rank of a multi-process launch takes its own GPU."""

from __future__ import annotations

import pytest
import torch

from unigendet.config.loader import ConfigError
from unigendet.inference.loading import resolve_device


@pytest.mark.parametrize("device, env, expected", [
    ("cuda", {"LOCAL_RANK": "3"}, "cuda:3"),
    ("cuda", {}, "cuda"),
    ("cuda:1", {"LOCAL_RANK": "3"}, "cuda:1"),
    ("cpu", {"LOCAL_RANK": "3"}, "cpu"),
])
def test_index_less_cuda_follows_local_rank(device, env, expected):
    assert resolve_device(device, env) == torch.device(expected)


def test_the_default_device_follows_local_rank_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, {"LOCAL_RANK": "5"}) == torch.device("cuda", 5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, {"LOCAL_RANK": "5"}) == torch.device("cpu")


def test_the_process_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2)


def test_a_malformed_local_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="LOCAL_RANK must be a non-negative integer, got 'x'"):
        resolve_device("cuda", {"LOCAL_RANK": "x"})
