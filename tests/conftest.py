"""Shared fixtures: the tiny model config, a seeded generator and a mixed set of random samples."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import det_sample, t2i_sample, tiny_config

from unigendet.labels import LABEL_FAKE, LABEL_REAL
from unigendet.models.config import ModelConfig


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def mixed_samples(gen):
    """Two SMSA detection samples (fake, real) and two text-to-image samples of different sizes."""
    return [
        det_sample(gen, label=LABEL_FAKE),
        t2i_sample(gen, (32, 32)),
        det_sample(gen, vae_hw=(48, 32), vit_hw=(42, 28), label=LABEL_REAL),
        t2i_sample(gen, (16, 48)),
    ]


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off costs that, on a busy machine, make each small
    matrix product hundreds of times slower. The previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """The command line installs a stderr handler on the root logger; under pytest that stream is the test's
    capture, closed when the test ends. Restoring the handlers keeps later tests (and server threads still
    logging) from writing to a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _fingerprint_cache(tmp_path_factory, monkeypatch):
    """Weight fingerprints are cached on disk across processes; tests keep that cache out of the home directory."""
    monkeypatch.setenv("UNIGENDET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "unigendet-cache"))
