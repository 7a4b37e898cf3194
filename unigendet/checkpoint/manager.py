"""Training checkpoints through DeepSpeed, with resume, keep-last-k and model export.

Layout of ``checkpoint.dir``::

    step_0000200/            DeepSpeed's files (model/optimizer shards of every rank)
        COMPLETE             written by rank 0 after every rank has finished saving
        train_config.yaml    the resolved config of the run
    step_0000400/ ...
    latest                   DeepSpeed's pointer (informational; we resume from COMPLETE dirs)

Every rank calls ``save`` (DeepSpeed needs all ranks). Per-rank state (data position, RNG
streams) is all-gathered into the client state, so a resume on the same world size continues
each rank exactly where it stopped. A directory without ``COMPLETE`` (a crash mid-save) is never
resumed from and never counted by keep-last-k.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from unigendet.config.loader import save_config
from unigendet.distributed import (
    all_gather_object,
    barrier,
    is_main_process,
    rank,
    world_size,
)

logger = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        m = TAG_RE.match(child.name)
        if m and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last_k: int, run_config: Any):
        self.directory = Path(directory)
        self.keep_last_k = keep_last_k
        self.run_config = run_config

    def save(self, engine, step: int, per_rank_state: dict[str, Any], write_extra=None) -> Path:
        """Save on every rank; ``write_extra(path)`` (all ranks) adds files before COMPLETE is written."""
        tag = step_tag(step)
        gathered = all_gather_object(per_rank_state)
        client_state = {"step": step, "world_size": world_size(), "per_rank": gathered}
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state)
        path = self.directory / tag
        if write_extra is not None:
            write_extra(path)
        barrier()
        if is_main_process():
            save_config(self.run_config, path / "train_config.yaml")
            (path / COMPLETE).write_text(f"{step}\n")
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", path)
        return path

    def _prune(self) -> None:
        complete = complete_checkpoints(self.directory)
        for _, path in complete[: max(len(complete) - self.keep_last_k, 0)]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed old checkpoint %s", path)

    def resolve_resume(self, resume: str) -> Path | None:
        """``auto``: newest complete checkpoint in the directory (None if there is none);
        ``none``: None; otherwise a checkpoint directory that must be complete."""
        if resume == "none":
            return None
        if resume == "auto":
            complete = complete_checkpoints(self.directory)
            return complete[-1][1] if complete else None
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint directory (no {COMPLETE})")
        return path

    def load(self, engine, path: Path) -> tuple[int, dict[str, Any]]:
        """Restore engine state (model, optimizer, scheduler) and return (step, this rank's state)."""
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        saved_world = client_state["world_size"]
        if saved_world != world_size():
            raise RuntimeError(
                f"checkpoint {path} was written by {saved_world} ranks but this run has {world_size()}: the per-rank "
                "data position cannot be mapped exactly. Resume on the same number of ranks, or start a new run "
                "from an exported model (init.kind=unigendet)."
            )
        logger.info("resumed from %s (step %d)", path, client_state["step"])
        return int(client_state["step"]), client_state["per_rank"][rank()]


def consolidated_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 CPU state dict on rank 0 (empty elsewhere), gathering ZeRO-3 partitions one
    parameter at a time so no rank ever holds the whole model twice."""
    state: dict[str, torch.Tensor] = {}
    if zero_stage == 3:
        import deepspeed

        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main_process():
                    state[name] = param.detach().float().cpu().clone()
        if is_main_process():
            # Only persistent buffers belong in a checkpoint (RoPE and sin-cos tables are recomputed).
            persistent = set(module.state_dict()) - set(state)
            for name, buf in module.named_buffers():
                if name in persistent:
                    state[name] = buf.detach().cpu().clone()
    elif is_main_process():
        state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                 for k, v in module.state_dict().items()}
    return state
