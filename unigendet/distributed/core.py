"""Rank/world helpers that work with or without an initialised process group."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import NoReturn

import torch
import torch.distributed as dist

from unigendet.utils.errors import RunError

logger = logging.getLogger(__name__)

# Whether this process has started a process group (``exit_process`` then skips the interpreter's teardown).
_STARTED_PROCESS_GROUP = False


def init_process_group(device_type: str) -> None:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU).

    Launchers (deepspeed, torchrun, SLURM via launch/) set RANK/WORLD_SIZE/MASTER_*; a plain
    ``python`` run becomes a world of one, so the same code path serves both. A world of one meets through a
    file in a private temporary directory rather than a TCP port: picking a "free" port and binding it later
    races with every other process doing the same (seen as EADDRINUSE when runs start side by side).
    """
    global _STARTED_PROCESS_GROUP
    if dist.is_available() and dist.is_initialized():
        return
    _STARTED_PROCESS_GROUP = True
    os.environ.update(slurm_rank_environment(os.environ))
    init_method = None
    if _world_of_one(os.environ):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        store_dir = tempfile.mkdtemp(prefix="unigendet-world-of-one-")
        atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
        init_method = f"file://{store_dir}/store"
    import deepspeed

    backend = "nccl" if device_type == "cuda" else "gloo"
    if init_method is None:
        deepspeed.init_distributed(dist_backend=backend)
    else:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=init_method, rank=0,
                                   world_size=1)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _world_of_one(env: Mapping[str, str]) -> bool:
    """No launcher set the ranks, or only the variables this module itself sets for a world of one are present
    (a child process inherits them: it must not look for a master it was never given)."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return False
    if "RANK" not in env:
        return True
    return env.get("WORLD_SIZE") == "1" and not env.get("MASTER_ADDR") and not env.get("MASTER_PORT")


def slurm_rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE of a task started by ``srun`` without torchrun.

    Nothing when a launcher already set RANK, or when SLURM started one task. With several tasks, the task ids
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE) become the rank variables, so the
    tasks form one job; MASTER_ADDR and MASTER_PORT must then be exported by the batch script. Without them
    the tasks would each start as a separate world of one and write to the same checkpoint directory, so that
    is a RunError saying how to launch instead.
    """
    if "RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        return {}
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if tasks is None or int(tasks) <= 1:
        return {}
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise RunError(
            f"started by srun as {tasks} tasks without a distributed launcher and without {', '.join(missing)}: "
            "the tasks would run as separate single-rank jobs writing to one checkpoint directory. Launch with "
            "torchrun (launch/slurm_example.sbatch), or export MASTER_ADDR=$(scontrol show hostnames "
            "\"$SLURM_JOB_NODELIST\" | head -n1) and MASTER_PORT=29500 before srun")
    per_node = (env.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
    local_world = per_node if per_node.isdigit() else tasks
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": local_world}


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def close_process_group() -> None:
    """Wait for every rank, then tear the process group down. Called before a multi-rank process exits: a rank
    that exits while a peer still holds the group open closes its sockets under the peer's communication threads,
    which on CPU (gloo) aborted the peer ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``: the exit of a program's entry point. A process that started a process group
    runs its exit handlers, flushes its logs and streams, and then ends without the interpreter's teardown.

    Two-rank CPU launches whose work had finished (report written, group destroyed) still ended, at random and
    rarely, with "terminate called without an active exception" (SIGABRT) during the teardown, and the launcher
    then reported the run failed. The likely cause: destroying the group does not free it while DeepSpeed holds
    references to it (on every ZeRO-3 parameter, for one), so gloo's worker threads outlive the interpreter; a
    C++ thread that needs the interpreter lock of a finalising interpreter is ended mid-call, which aborts the
    process. Whatever the thread, skipping the teardown leaves nothing to race; the operating system frees the
    rest."""
    if not _STARTED_PROCESS_GROUP:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is untouched)."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj):
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
