"""The launch scripts' shell logic: hostfile parsing, the no-GPU refusal, the environment file for remote ranks,
and SLURM tasks started without a distributed launcher."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

from unigendet.distributed.core import slurm_rank_environment
from unigendet.utils.errors import RunError

COMMON = REPO / "launch" / "common.sh"


def bash(script: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {COMMON}; {script}"], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=60)


def test_the_first_host_skips_comments_and_blank_lines(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster A\n\n   \n  # gpu nodes\nnode-07 slots=8  # fast one\nnode-08 slots=8\n")
    assert bash(f"first_host {hostfile}").stdout.strip() == "node-07"
    hostfile.write_text("# nothing here\n\n")
    out = bash(f"first_host {hostfile}")
    assert out.returncode != 0 and "lists no host" in out.stderr
    out = bash(f"first_host {tmp_path / 'missing'}")
    assert out.returncode != 0 and "not found" in out.stderr


def test_single_node_refuses_to_start_without_a_visible_gpu(tmp_path):
    env = {"CONFIG": "configs/train/gduf_demo.yaml", "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("NGPUS", None)
    out = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh")], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=REPO, timeout=120)
    assert out.returncode != 0
    assert "no GPU is visible" in out.stderr and "--num_gpus 0" not in out.stderr


def test_the_environment_file_carries_the_variables_set_here(tmp_path):
    env = {"HF_HOME": "/shared/hf", "WANDB_MODE": "offline", "NCCL_DEBUG": "INFO"}
    out = bash("unset HF_HUB_OFFLINE WANDB_API_KEY; write_deepspeed_env .deepspeed_env", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
    assert {"HF_HOME=/shared/hf", "WANDB_MODE=offline", "NCCL_DEBUG=INFO"} <= set(lines)
    assert not any(line.startswith("HF_HUB_OFFLINE=") for line in lines)
    (tmp_path / ".deepspeed_env").write_text("MINE=1\n")
    bash("write_deepspeed_env .deepspeed_env", env=env, cwd=tmp_path)
    assert (tmp_path / ".deepspeed_env").read_text() == "MINE=1\n"  # a user's own file is never overwritten


def test_srun_tasks_without_a_launcher_become_one_job_or_are_refused():
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)"}
    with pytest.raises(RunError, match="16 tasks without a distributed launcher and without MASTER_ADDR, "
                                       "MASTER_PORT.*one checkpoint directory"):
        slurm_rank_environment(slurm)
    ranks = slurm_rank_environment({**slurm, "MASTER_ADDR": "node-07", "MASTER_PORT": "29500"})
    assert ranks == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    assert slurm_rank_environment({**slurm, "RANK": "3"}) == {}  # torchrun / deepspeed already set the ranks
    assert slurm_rank_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}


@pytest.mark.slow
def test_a_child_of_a_world_of_one_starts_its_own(tmp_path):
    """A process that inherits the rank variables an in-process run set (RANK=0, WORLD_SIZE=1, no master) trains
    as its own world of one instead of looking for a master or an MPI launcher."""
    code = ("from unigendet.distributed.core import init_process_group; import torch.distributed as dist; "
            "init_process_group('cpu'); print(dist.get_world_size(), dist.get_rank())")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "DS_ACCELERATOR": "cpu"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1 0"


@pytest.mark.slow
def test_exit_process_after_a_process_group_runs_exit_handlers_and_flushes(tmp_path):
    """A process that started a process group ends through ``exit_process`` with its code, after its exit handlers
    ran and its log and streams were flushed (the interpreter teardown it skips is where gloo's threads aborted)."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, logging, sys\n"
        "from unigendet.distributed import close_process_group, exit_process, init_process_group\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        "init_process_group('cpu')\n"
        "logging.getLogger('probe').info('logged before the exit')\n"
        "sys.stdout.write('unflushed stdout')\n"
        "close_process_group()\n"
        "exit_process(3)\n"
        "print('not reached')\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.endswith("unflushed stdout")
    assert "logged before the exit" in out.stderr
    assert marker.read_text() == "yes"


def test_exit_process_without_a_process_group_is_sys_exit():
    from unigendet.distributed import exit_process

    with pytest.raises(SystemExit) as stop:
        exit_process(4)
    assert stop.value.code == 4
