"""Rank-aware logging: rank 0 logs at the chosen level, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else "WARNING")
    # Third-party chatter that hides our own progress lines.
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel("WARNING")
