"""The detector tests run tiny tensors with one intra-op thread (the shared ``single_thread`` fixture)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs with one intra-op thread (the shared ``single_thread`` fixture)."""
