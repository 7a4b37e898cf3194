"""The detector tests run tiny tensors: one intra-op thread avoids OpenMP hand-off costs that, on a busy
machine, make each small matrix product hundreds of times slower. The previous setting is restored."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
