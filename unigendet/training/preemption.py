"""Preemption: a signal asks for a checkpoint at the next step boundary and a clean exit.

The first of the configured signals (default SIGTERM, sent by schedulers on preemption or ``scancel``,
and SIGUSR1, which SLURM sends ahead of the time limit with ``--signal=USR1@<seconds>``) only sets a
flag. At the end of the optimizer step in progress, the ranks reduce that flag (any rank that got the
signal is enough), every rank saves the checkpoint of that step, and ``Trainer.train`` raises
``TrainingPreempted``: the process exits with status ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: "try
again"), which a requeue script can test. Resuming from that checkpoint continues exactly.

A second signal, ``duplicate_window_s`` seconds or more after the first, ends the process at once with
status 128 + the signal number (143 for SIGTERM), even while it waits in a collective: a watcher thread
sees every signal as it arrives (``signal.set_wakeup_fd``) and calls ``os._exit``. A repeat within the
window is taken as the same request delivered twice and ignored: SLURM signals every process of a job
step while a launcher such as torchrun forwards the signal it got to the same ranks.

DataLoader workers survive these signals unless their parent sends them (a scheduler signals every
process of a job, and the step being checkpointed still reads from the workers).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from unigendet.config.loader import ConfigError
from unigendet.config.ranges import require_non_negative

logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: a temporary failure; the job is meant to be run again and resume.
EXIT_PREEMPTED = 75

_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


@dataclass
class PreemptionConfig:
    """Signal names that trigger a checkpoint and a clean exit (``[]``: none, signals keep their default
    action), and how long after the first a repeat is still the same request (see the module docstring)."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    duplicate_window_s: float = 5.0

    def validate(self) -> None:
        for name in self.signals:
            if name in _UNCATCHABLE or not isinstance(getattr(signal, name, None), signal.Signals):
                raise ConfigError(f"signals: {name!r} is not a signal name that can be caught (e.g. SIGTERM, SIGUSR1)")
        require_non_negative("duplicate_window_s", self.duplicate_window_s)

    def signal_numbers(self) -> tuple[signal.Signals, ...]:
        return tuple(signal.Signals[name] for name in self.signals)


class TrainingPreempted(SystemExit):
    """Raised after the preemption checkpoint; as a ``SystemExit`` it ends the process with ``EXIT_PREEMPTED``."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"preempted at step {self.step}; checkpoint {self.checkpoint}"


class PreemptionWatch:
    """Installs the handlers (main thread only), records whether a signal arrived, and ends the process on a
    later repeat."""

    def __init__(self, signals: tuple[signal.Signals, ...], duplicate_window_s: float = 5.0):
        self.signals = signals
        self.duplicate_window_s = duplicate_window_s
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._previous_wakeup: int | None = None
        self._wakeup_write: int | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training runs outside the main thread: no preemption handler for %s",
                           ", ".join(s.name for s in self.signals))
            return
        read_end, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_write, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_end,), daemon=True, name="preemption-watch").start()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received = signal.Signals(signum)
        logger.warning("received %s: saving a checkpoint at the end of this step, then exiting with status %d "
                       "(the same signal again, %gs or more later, exits at once)", self.received.name,
                       EXIT_PREEMPTED, self.duplicate_window_s)

    def _watch(self, read_end: int) -> None:
        """Runs in its own thread, so it acts even while the main thread is blocked in native code."""
        ours = {int(s) for s in self.signals}
        first: float | None = None
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum not in ours:
                        continue
                    now = time.monotonic()
                    if first is None:
                        first = now
                    elif now - first >= self.duplicate_window_s:
                        os.write(2, f"{signal.Signals(signum).name} again: exiting at once\n".encode())
                        os._exit(128 + signum)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._wakeup_write is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._wakeup_write)  # the watcher reads end-of-file and stops
            self._wakeup_write = None
