"""The service tests run a tiny spectral detector: one intra-op thread (tiny tensors; the previous setting is
restored), and one saved detector for the whole session."""

from __future__ import annotations

import pytest
from serving_data import save_tiny_spectral


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs with one intra-op thread (the shared ``single_thread`` fixture)."""


@pytest.fixture(scope="session")
def spectral_dir(tmp_path_factory):
    return save_tiny_spectral(tmp_path_factory.mktemp("spectral"))
