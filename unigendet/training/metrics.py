"""Step metrics: averaged over ranks at log intervals only, logged on rank 0 (logger, progress
bar on a terminal, wandb when enabled — offline by default, needing no network)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from unigendet.config.loader import to_dict
from unigendet.distributed import all_reduce_sum, is_main_process, world_size

logger = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.interval = cfg.logging.interval
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
        directory = Path(self.cfg.checkpoint.dir)
        directory.mkdir(parents=True, exist_ok=True)
        # One JSON line per logged step, appended across resumes: the run's loss curve on disk.
        self.jsonl = (directory / "metrics.jsonl").open("a")
        show = self.cfg.logging.progress_bar
        if show == "always" or (show == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=self.cfg.total_steps, initial=step, dynamic_ncols=True, desc="train")
        if self.cfg.logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", self.cfg.logging.wandb_mode)
            self.wandb = wandb.init(project=self.cfg.logging.wandb_project, name=self.cfg.logging.run_name,
                                    config=to_dict(self.cfg), dir=self.cfg.checkpoint.dir)

    def record(self, step: int, metrics: dict[str, torch.Tensor], tokens: int, seconds: float, engine, scheduler) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v.detach().float()
        self.count += 1
        self.tokens += tokens
        self.seconds += seconds
        if self.bar is not None:
            self.bar.update(1)
        if step % self.interval and step != self.cfg.total_steps:
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
