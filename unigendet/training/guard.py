"""The non-finite / divergence guard: which optimizer steps are skipped, and when a run gives up.

Every optimizer step, the trainer reduces over ranks the step's mean loss and how many ranks saw a
non-finite loss (or, where DeepSpeed does not check them itself, non-finite gradients), so every rank
takes the same decision:

* a NaN/inf loss on any rank, or a NaN/inf global gradient norm (DeepSpeed's own overflow check), skips
  the step on every rank: the gradients are discarded, parameters and optimizer state are untouched, and
  the learning-rate schedule moves on as for any step (its position always equals the step count);
* ``max_consecutive_skips`` skipped steps in a row stop the run;
* after ``loss_spike_warmup`` applied steps, a loss above ``loss_spike_factor`` times the median of the
  last ``loss_spike_window`` applied steps' losses stops the run before that step's update
  (``on_spike: stop``), or skips that step like a non-finite one (``on_spike: skip``): one batch that a
  small, noisy objective gets badly wrong then costs one update instead of the run, while a real divergence,
  whose every step spikes, still stops it through ``max_consecutive_skips``.

A stopped run raises ``TrainingDivergedError`` and exports nothing; its last checkpoint is intact. The
counters are logged with the metrics and saved in every checkpoint, so a resumed run keeps them.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative, require_range
from unigendet.distributed import is_main_process
from unigendet.utils.errors import RunError

logger = logging.getLogger(__name__)

SPIKE_ACTIONS = ("stop", "skip")


@dataclass
class GuardConfig:
    """When a step is skipped and when the run stops (see the module docstring). Losses are
    non-negative, so a multiple of their median is a meaningful ceiling; ``loss_spike_factor: 0`` turns
    the spike check off."""

    max_consecutive_skips: int = 10
    loss_spike_factor: float = 10.0
    loss_spike_warmup: int = 20
    loss_spike_window: int = 100
    on_spike: str = "stop"  # "stop" the run, or "skip" the step (counted with the non-finite skips)

    def validate(self) -> None:
        if self.on_spike not in SPIKE_ACTIONS:
            raise ConfigError(f"on_spike must be one of {SPIKE_ACTIONS}, got {self.on_spike!r}")
        require_range("max_consecutive_skips", self.max_consecutive_skips, 1)
        require_non_negative("loss_spike_factor", self.loss_spike_factor)
        if 0 < self.loss_spike_factor <= 1:
            raise ConfigError(f"loss_spike_factor must be 0 (off) or > 1, got {self.loss_spike_factor!r}")
        require_range("loss_spike_window", self.loss_spike_window, 1)
        require_range("loss_spike_warmup", self.loss_spike_warmup, 1, self.loss_spike_window)


class TrainingDivergedError(RunError):
    """The run stopped because its loss diverged; no final model was exported."""

    def __init__(self, step: int, reason: str, setting: str):
        self.step = step
        super().__init__(f"training stopped at step {step}: {reason} ({setting}); no final model was exported. "
                         "The last checkpoint is intact: lower optim.lr or fix the data, then resume from it.")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class DivergenceGuard:
    """Counts skipped steps and watches the loss; every rank holds the same state (it sees only reduced values)."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.recent: deque[float] = deque(maxlen=cfg.loss_spike_window)

    def check_spike(self, step: int, loss: float) -> str | None:
        """Before step ``step``'s update: is its (finite) loss far above the recent median? With ``on_spike: stop``
        that raises ``TrainingDivergedError``; with ``skip`` it returns the reason, the caller skips the step and
        passes the reason to :meth:`record`. None: no spike."""
        factor = self.cfg.loss_spike_factor
        if not factor or not math.isfinite(loss) or len(self.recent) < self.cfg.loss_spike_warmup:
            return None
        median = statistics.median(self.recent)
        if not (median > 0 and loss > factor * median):
            return None
        reason = (f"loss {loss:.4g} is {loss / median:.3g}x the median {median:.4g} of the last "
                  f"{len(self.recent)} applied steps")
        if self.cfg.on_spike == "stop":
            raise TrainingDivergedError(step, reason, f"guard.loss_spike_factor={factor:g}")
        return reason

    def record(self, step: int, loss: float, applied: bool, grad_norm: float | None,
               spike: str | None = None) -> None:
        """Count step ``step``: an applied step resets the run of skips, a skipped one extends it. ``spike``: the
        reason :meth:`check_spike` gave for skipping it (otherwise the skip was for a non-finite value)."""
        if applied:
            self.consecutive_skips = 0
            if math.isfinite(loss):
                self.recent.append(loss)
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        reason = spike or f"non-finite loss or gradient norm: loss {_fmt(loss)}, gradient norm {_fmt(grad_norm)}"
        if is_main_process():
            logger.warning("step %d skipped (%s); %d in a row, %d in all", step, reason, self.consecutive_skips,
                           self.skipped_steps)

    def stop_if_stuck(self, step: int, loss: float, grad_norm: float | None) -> None:
        limit = self.cfg.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise TrainingDivergedError(
                step, f"{self.consecutive_skips} optimizer steps in a row were skipped (last loss {_fmt(loss)}, "
                f"gradient norm {_fmt(grad_norm)})", f"guard.max_consecutive_skips={limit}")

    def counters(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def state_dict(self) -> dict[str, Any]:
        return {**self.counters(), "recent_losses": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent_losses"])
