"""Process-group setup, DeepSpeed engine construction and cross-rank reductions.

DeepSpeed is imported lazily, inside the functions that need it, so the library imports without it.
"""

from unigendet.distributed.core import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    close_process_group,
    exit_process,
    init_process_group,
    is_main_process,
    rank,
    world_size,
)

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "close_process_group",
    "exit_process",
    "init_process_group",
    "is_main_process",
    "rank",
    "world_size",
]
