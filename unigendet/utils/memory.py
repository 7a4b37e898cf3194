"""This process's memory figures: peak host resident set and, on CUDA, the allocator's current and peak bytes."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 2**30


def peak_host_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def memory_summary(device: torch.device) -> str:
    """One line for the logs: peak host RSS and, on a CUDA device, allocated / peak allocated GPU memory."""
    text = f"peak host RSS {peak_host_rss_bytes() / GIB:.2f} GiB"
    if device.type == "cuda":
        text += (f", GPU allocated {torch.cuda.memory_allocated(device) / GIB:.2f} GiB "
                 f"(peak {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB)")
    return text
