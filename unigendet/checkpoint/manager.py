"""Training checkpoints through DeepSpeed: atomic saves with a manifest, verified resume, keep-last-k.

Checkpoints are trusted input: DeepSpeed's loader unpickles its own files (``torch.load`` with
``weights_only=False``), which can run code. The manifest check before loading catches torn and corrupted
files, not a hostile directory; resume only from checkpoints you wrote.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from unigendet.checkpoint.manifest import (
    COMPLETE,
    file_entry,
    fsync_directory,
    list_files,
    read_manifest,
    verify_entries,
    write_json_durably,
    write_manifest,
)
from unigendet.checkpoint.state_json import read_state, write_state
from unigendet.config.loader import ConfigError, save_config
from unigendet.config.ranges import require_range
from unigendet.distributed import (
    all_gather_object,
    barrier,
    is_main_process,
    rank,
    world_size,
)
from unigendet.utils.errors import RunError
from unigendet.utils.safetensors_shards import parse_size

logger = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{7,})$")
# A save in progress (or one that never finished): ``step_0000200.tmp``; also ``.replaced`` while a
# checkpoint of the same step is swapped out. Never resumed from, removed by the next save.
PARTIAL_RE = re.compile(r"^step_\d{7,}\.(tmp|replaced)$")
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RunError):
    """A checkpoint could not be written or read."""


class CheckpointIntegrityError(CheckpointError):
    """No checkpoint to resume from passes its manifest check; the message names the file that failed."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions, ...); earlier checkpoints are untouched."""


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def rank_state_name(r: int) -> str:
    return f"rank_state_{r:05d}.json"


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


def partial_directories(directory: str | Path) -> list[Path]:
    """Directories left by saves that did not finish: temporary ones, and step directories without ``COMPLETE``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(child for child in directory.iterdir() if child.is_dir() and (
        PARTIAL_RE.match(child.name) or (TAG_RE.match(child.name) and not (child / COMPLETE).is_file())))


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, what to resume, and whether to export at the end."""

    dir: str = "runs/checkpoints"
    interval: int = 200
    keep_last_k: int = 3
    # auto: resume the newest checkpoint in ``dir`` that passes its manifest check, if any; none: start
    # fresh; or a checkpoint directory (which must pass the check).
    resume: str = "auto"
    # Write a consolidated safetensors model directory (from_pretrained layout) at the end.
    export_final: bool = True
    # Precision of that export (fp32 keeps the training values exactly, e.g. to start the next stage from them;
    # bf16 halves its size) and its largest shard ("5GB", "500MB"; "none": one file).
    export_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    export_max_shard_size: str = "5GB"
    # Check every file's SHA-256 before resuming (false: sizes only, for very large checkpoints on slow disks).
    verify_checksums: bool = True

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("dir must not be empty")
        require_range("interval", self.interval, 1)
        require_range("keep_last_k", self.keep_last_k, 1)
        if not self.resume:
            raise ConfigError("resume must be 'auto', 'none' or a checkpoint directory")
        if self.export_max_shard_size != "none":
            try:
                parse_size(self.export_max_shard_size)
            except ValueError as err:
                raise ConfigError(f"export_max_shard_size: {err}") from err

    def export_shard_size(self) -> str | None:
        return None if self.export_max_shard_size == "none" else self.export_max_shard_size


def _from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op on one process)."""
    return all_gather_object(obj)[0]


class CheckpointManager:
    """Saves, verifies, finds and prunes the step checkpoints of one run. ``run_config`` (any config
    dataclass) is written into every checkpoint as ``train_config.yaml``.

    Layout of ``checkpoint.dir``::

        step_0000200/                DeepSpeed's files (model/optimizer shards of every rank), and ours:
            rank_state_00000.json    each rank's data position and RNG streams (JSON, no pickle)
            trainer_state.json       step, world size, guard counters
            train_config.yaml        the resolved config of the run
            manifest.json            every file above with its size and SHA-256
            COMPLETE                 the last file written
        step_0000200.tmp/            a save in progress; renamed to step_0000200/ once complete
        latest                       the newest tag, for DeepSpeed's tools (we resume by manifest)

    Every rank calls ``save``, ``resolve_resume`` and ``load`` (DeepSpeed and the checks are collective).
    A save writes into the temporary directory; once every rank's files and the manifest are on disk it is
    renamed into place, so a crash at any point leaves the earlier checkpoints as they were. Resuming checks
    the manifest before DeepSpeed reads a byte and falls back to the newest checkpoint that passes.
    """

    def __init__(self, cfg: CheckpointConfig, run_config: Any = None):
        self.cfg = cfg
        self.directory = Path(cfg.dir)
        self.keep_last_k = cfg.keep_last_k
        self.run_config = run_config

    def due(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step ``step`` ends with a checkpoint (every ``interval`` steps, and the last)."""
        return step % self.cfg.interval == 0 or step == total_steps

    # ---- saving

    def save(self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any],
             write_extra: Callable[[Path], None] | None = None) -> Path:
        """Save step ``step`` on every rank. ``trainer_state`` (plain JSON, the same on every rank) is written
        once, ``rank_state`` per rank; ``write_extra(directory)`` (all ranks) adds files of its own."""
        final = self.directory / step_tag(step)
        temp = final.with_name(final.name + ".tmp")
        if is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_partial()
        barrier()
        with self._naming_failures(step, temp):
            engine.save_checkpoint(str(self.directory), tag=temp.name, client_state={"step": step}, save_latest=False)
            write_state(temp / rank_state_name(rank()), rank_state)
            if write_extra is not None:
                write_extra(temp)
            if is_main_process():
                save_config(self.run_config, temp / "train_config.yaml")
                write_json_durably(temp / TRAINER_STATE, {**trainer_state, "step": step, "world_size": world_size()})
        barrier()
        with self._naming_failures(step, temp):
            entries = self._hash_share(temp)
        if is_main_process():
            with self._naming_failures(step, temp):
                write_manifest(temp, step, entries)
                (temp / COMPLETE).write_text(f"{step}\n")
                fsync_directory(temp)
                self._move_into_place(temp, final)
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def _hash_share(self, temp: Path) -> list[dict[str, Any]]:
        """Every rank hashes (and flushes to disk) its share of the files; rank 0 gets all the entries."""
        files = _from_main(list_files(temp) if is_main_process() else None)
        mine = [file_entry(temp, rel, checksum=True) for rel in files[rank()::world_size()]]
        return [entry for share in all_gather_object(mine) for entry in share]

    def _move_into_place(self, temp: Path, final: Path) -> None:
        if final.exists():
            # Same step saved again (after resuming from an earlier checkpoint): the new one replaces it.
            aside = final.with_name(final.name + ".replaced")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            os.rename(temp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(temp, final)
        latest = self.directory / "latest.tmp"
        latest.write_text(final.name)
        os.replace(latest, self.directory / "latest")
        fsync_directory(self.directory)

    @contextlib.contextmanager
    def _naming_failures(self, step: int, temp: Path) -> Iterator[None]:
        """Turns an OSError / RuntimeError of a save (disk full, permissions, torch's zip writer, which names
        no file) into a ``CheckpointWriteError`` naming the directory, the cause and the checkpoint that is
        still intact."""
        try:
            yield
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as err:
            if world_size() == 1:
                shutil.rmtree(temp, ignore_errors=True)  # free the space now; with more ranks the next save does
            raise CheckpointWriteError(self._write_failure(step, temp, err)) from err

    def _write_failure(self, step: int, temp: Path, err: BaseException) -> str:
        cause = f"{type(err).__name__}: {err}"
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "unexpected pos" in str(err):
            try:
                free = shutil.disk_usage(self.directory).free / 2**20
                cause += f" (the filesystem may be full: {free:.0f} MiB free)"
            except OSError:
                pass
        complete = complete_checkpoints(self.directory)
        kept = f"the newest complete checkpoint, {complete[-1][1]}, is intact" if complete else "no earlier checkpoint"
        return f"could not write the checkpoint of step {step} to {temp}: {cause}; {kept}"

    def _remove_partial(self) -> None:
        for path in partial_directories(self.directory):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by a save that did not finish", path)

    def _prune(self) -> None:
        complete = complete_checkpoints(self.directory)
        for _, path in complete[: max(len(complete) - self.keep_last_k, 0)]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed old checkpoint %s", path)

    # ---- resuming

    def verify(self, path: Path) -> str | None:
        """The first problem with checkpoint ``path`` (named by file), or None; each rank checks a share."""
        if is_main_process():
            entries, problem = read_manifest(path) if (path / COMPLETE).is_file() else (None, f"no {COMPLETE} marker")
        else:
            entries, problem = None, None
        entries, problem = _from_main((entries, problem))
        if problem is not None:
            return problem
        mine = verify_entries(path, entries[rank()::world_size()], checksum=self.cfg.verify_checksums)
        return next((p for p in all_gather_object(mine) if p is not None), None)

    def resolve_resume(self) -> Path | None:
        """The checkpoint to resume from, by ``cfg.resume``, checked against its manifest. ``auto``: the newest
        one that passes (None if there are none; an error if there are some and none passes); ``none``: None;
        otherwise that directory, which must pass."""
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = self.verify(path)
            if problem is not None:
                raise CheckpointIntegrityError(f"checkpoint.resume={resume!r} cannot be resumed: {problem}")
            return path
        if is_main_process():
            for partial in partial_directories(self.directory):
                logger.warning("ignoring %s: a save that did not finish (the next save removes it)", partial)
        candidates = _from_main([str(p) for _, p in complete_checkpoints(self.directory)])
        failures = []
        for candidate in map(Path, reversed(candidates)):
            problem = self.verify(candidate)
            if problem is None:
                return candidate
            failures.append(f"{candidate.name}: {problem}")
            if is_main_process():
                logger.warning("checkpoint %s fails its check: %s; trying the previous one", candidate, problem)
        if failures:
            raise CheckpointIntegrityError(f"no checkpoint in {self.directory} passes its manifest check ("
                                           + "; ".join(failures) + "); set checkpoint.resume=none to start over")
        return None

    def load(self, engine, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engine state (model, optimizer, scheduler) from a checkpoint that ``verify`` passed; returns
        (the trainer state, this rank's state)."""
        trainer_state = read_state(path / TRAINER_STATE)
        saved_world = trainer_state["world_size"]
        if saved_world != world_size():
            raise CheckpointError(
                f"checkpoint {path} was written by {saved_world} ranks but this run has {world_size()}: the per-rank "
                "data position cannot be mapped exactly. Resume on the same number of ranks, or start a new run "
                "from an exported model (init.kind=unigendet)."
            )
        rank_state = read_state(path / rank_state_name(rank()))
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        logger.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state, rank_state


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
