"""Step metrics: averaged over ranks at log intervals only, logged on rank 0 (logger, progress
bar on a terminal, wandb when enabled — offline by default, needing no network)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from unigendet.config.ranges import require_range
from unigendet.distributed import all_reduce_sum, is_main_process, world_size

logger = logging.getLogger(__name__)


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "unigendet"
    wandb_mode: Literal["online", "offline"] = "offline"
    run_name: str | None = None
    progress_bar: Literal["auto", "always", "never"] = "auto"  # auto: only on a terminal

    def validate(self) -> None:
        require_range("interval", self.interval, 1)


class MetricsLogger:
    """Writes ``metrics.jsonl`` (and the wandb run) into ``directory``; the last of ``total_steps``
    is always logged. ``run_config`` (plain data) is what wandb records as the run's config.

    ``metrics.jsonl`` is one file per run directory, appended across resumes. A run that starts at step
    S (a resume, or 0 for a fresh start) first drops the entries after step S: those steps are trained and
    logged again, so every step appears once, with the values of the run that kept it."""

    def __init__(self, cfg: LoggingConfig, directory: str | Path, total_steps: int, device: torch.device,
                 run_config: dict[str, Any] | None = None):
        self.cfg = cfg
        self.directory = Path(directory)
        self.total_steps = total_steps
        self.run_config = run_config
        self.device = device
        self.interval = cfg.interval
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.count = 0
        self.tokens = 0
        self.seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.bar = None
        self.wandb = None
        self.jsonl = None

    def start(self, step: int) -> None:
        if not is_main_process():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "metrics.jsonl"
        drop_entries_after(path, step)
        # One JSON line per logged step, appended across resumes: the run's loss curve on disk.
        self.jsonl = path.open("a")
        show = self.cfg.progress_bar
        if show == "always" or (show == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=step, dynamic_ncols=True, desc="train")
        if self.cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", self.cfg.wandb_mode)
            self.wandb = wandb.init(project=self.cfg.wandb_project, name=self.cfg.run_name,
                                    config=self.run_config, dir=str(self.directory))

    def record(self, step: int, metrics: dict[str, torch.Tensor], tokens: int, seconds: float, engine, scheduler,
               counters: dict[str, int] | None = None) -> None:
        """Add one optimizer step; at log steps, write the averages since the last one. ``counters`` (the same on
        every rank, e.g. skipped steps) are logged as they are."""
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v.detach().float()
        self.count += 1
        self.tokens += tokens
        self.seconds += seconds
        if self.bar is not None:
            self.bar.update(1)
        if step % self.interval and step != self.total_steps:
            return
        keys = sorted(self.sums)
        # One all-reduce for every metric; this is the only host sync of the step.
        stacked = all_reduce_sum(torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.count), device=self.device)]))
        n = stacked[-1].item()
        values = {k: (stacked[i] / n).item() for i, k in enumerate(keys)}
        grad_norm = engine.get_global_grad_norm()
        values.update(
            lr=scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_s=self.tokens * world_size() / max(self.seconds, 1e-9),
        )
        values.update(counters or {})
        values["step"] = step
        self.history.append(values)
        if is_main_process():
            line = "  ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "step")
            logger.info("step %d  %s", step, line)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
            if self.wandb is not None:
                self.wandb.log(values, step=step)
            self.jsonl.write(json.dumps(values) + "\n")
            self.jsonl.flush()
        self.sums.clear()
        self.count, self.tokens, self.seconds = 0, 0, 0.0

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_entries_after(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` without its entries for steps after ``step`` (and without a line torn by a crash)."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if entry_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if not dropped:
        return
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("".join(line + "\n" for line in kept))
    os.replace(temp, path)
    logger.info("%s: dropped %d entries after step %d (this run logs those steps again)", path, dropped, step)
