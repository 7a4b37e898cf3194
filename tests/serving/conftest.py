"""The service tests run a tiny spectral detector: one intra-op thread (tiny tensors; the previous setting is
restored), and one saved detector for the whole session."""

from __future__ import annotations

import pytest
import torch
from serving_data import save_tiny_spectral


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def spectral_dir(tmp_path_factory):
    return save_tiny_spectral(tmp_path_factory.mktemp("spectral"))
