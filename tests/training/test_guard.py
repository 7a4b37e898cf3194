"""The pieces of the failure behaviour that need no training run: the divergence guard's counting and limits,
the preemption signal handler, metrics.jsonl after a resume, and range validation of the training config."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO

from unigendet.config.loader import ConfigError
from unigendet.training.config import load_train_config
from unigendet.training.guard import DivergenceGuard, GuardConfig, TrainingDivergedError
from unigendet.training.metrics import drop_entries_after
from unigendet.training.preemption import EXIT_PREEMPTED, PreemptionConfig, PreemptionWatch, TrainingPreempted

NAN = float("nan")


def test_consecutive_skips_stop_the_run_and_an_applied_step_resets_the_count():
    guard = DivergenceGuard(GuardConfig(max_consecutive_skips=2))
    guard.record(1, NAN, applied=False, grad_norm=None)
    guard.stop_if_stuck(1, NAN, None)
    guard.record(2, 1.0, applied=True, grad_norm=0.5)
    guard.record(3, NAN, applied=False, grad_norm=math.inf)
    guard.stop_if_stuck(3, NAN, math.inf)
    guard.record(4, 2.0, applied=False, grad_norm=math.inf)
    assert guard.counters() == {"skipped_steps": 3, "consecutive_skips": 2}
    with pytest.raises(TrainingDivergedError, match=r"step 4: 2 optimizer steps in a row .*max_consecutive_skips=2"):
        guard.stop_if_stuck(4, 2.0, math.inf)


def test_a_loss_spike_stops_the_run_after_the_warm_up_only():
    guard = DivergenceGuard(GuardConfig(loss_spike_factor=10, loss_spike_warmup=3, loss_spike_window=3))
    guard.check_spike(1, 1e9)  # no median yet
    for step, loss in enumerate([1.0, 2.0, 100.0, 3.0], start=1):
        guard.record(step, loss, applied=True, grad_norm=1.0)
    guard.check_spike(5, 29.0)  # median of the last three (2, 100, 3) is 3
    guard.check_spike(6, NAN)  # non-finite losses are the skip logic's business
    with pytest.raises(TrainingDivergedError, match=r"step 7: loss 31 is 10.3x the median 3 .*loss_spike_factor=10"):
        guard.check_spike(7, 31.0)
    DivergenceGuard(GuardConfig(loss_spike_factor=0, loss_spike_warmup=1)).check_spike(1, 1e30)


def test_on_spike_skip_skips_the_step_and_repeated_spikes_still_stop(caplog):
    guard = DivergenceGuard(GuardConfig(loss_spike_factor=10, loss_spike_warmup=2, loss_spike_window=3,
                                        max_consecutive_skips=2, on_spike="skip"))
    for step, loss in enumerate([1.0, 1.0], start=1):
        assert not guard.check_spike(step, loss)
        guard.record(step, loss, applied=True, grad_norm=1.0)
    with caplog.at_level("WARNING", logger="unigendet.training.guard"):
        reason = guard.check_spike(3, 50.0)
        assert reason
        guard.record(3, 50.0, applied=False, grad_norm=1.0, spike=reason)
    assert "step 3 skipped (loss 50 is 50x the median 1 of the last 2 applied steps); 1 in a row" in caplog.text
    assert guard.state_dict()["recent_losses"] == [1.0, 1.0]  # the spike does not move the median
    assert not guard.check_spike(4, 2.0)
    guard.record(4, 2.0, applied=True, grad_norm=1.0)
    assert guard.counters() == {"skipped_steps": 1, "consecutive_skips": 0}
    for step in (5, 6):
        reason = guard.check_spike(step, 1e3)
        assert reason
        guard.record(step, 1e3, applied=False, grad_norm=1.0, spike=reason)
    with pytest.raises(TrainingDivergedError, match=r"step 6: 2 optimizer steps in a row were skipped"):
        guard.stop_if_stuck(6, 1e3, 1.0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="unigendet.training.guard"):
        guard.record(7, NAN, applied=False, grad_norm=None)  # a non-finite skip keeps its own message
    assert "step 7 skipped (non-finite loss or gradient norm: loss nan" in caplog.text
    with pytest.raises(ConfigError, match="on_spike must be one of"):
        GuardConfig(on_spike="ignore").validate()


def test_guard_state_round_trips():
    guard = DivergenceGuard(GuardConfig())
    for step, (loss, applied) in enumerate([(1.0, True), (NAN, False), (2.0, True), (NAN, False)], start=1):
        guard.record(step, loss, applied, None)
    other = DivergenceGuard(GuardConfig())
    other.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert other.state_dict() == guard.state_dict() == {"skipped_steps": 2, "consecutive_skips": 1,
                                                        "recent_losses": [1.0, 2.0]}


def test_first_signal_sets_the_flag_and_a_quick_repeat_is_the_same_request():
    watch = PreemptionWatch(PreemptionConfig(signals=["SIGUSR1", "SIGUSR2"]).signal_numbers(), duplicate_window_s=60)
    previous = signal.getsignal(signal.SIGUSR1)
    watch.install()
    try:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.requested and watch.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR2)  # within the window: ignored, this process lives on
        time.sleep(0.2)
        assert watch.received == signal.SIGUSR1
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_a_later_repeat_exits_at_once_even_while_blocked_in_native_code():
    script = textwrap.dedent("""
        import os, signal, time
        from unigendet.training.preemption import PreemptionWatch
        watch = PreemptionWatch((signal.SIGTERM,), duplicate_window_s=0.2)
        watch.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        assert watch.requested
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # no Python handler runs any more
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGTERM again: exiting at once" in proc.stderr and time.monotonic() - start < 20


def test_preempted_exits_with_the_documented_status(tmp_path):
    err = TrainingPreempted(7, tmp_path / "step_0000007")
    assert isinstance(err, SystemExit) and err.code == EXIT_PREEMPTED == 75
    assert "step 7" in str(err)


def test_metrics_after_a_resume_keep_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    drop_entries_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    drop_entries_after(tmp_path / "absent.jsonl", 0)


@pytest.mark.parametrize("override, message", [
    ("logging.interval=0", "logging.interval must be >= 1, got 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be >= 0"),
    ("optim.max_grad_norm=.inf", "optim.max_grad_norm must be a finite number"),
    ("optim.betas=[2,3]", "optim.betas[0] must be in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1] must be in [0, 1)"),
    ("optim.eps=-1e-8", "optim.eps must be > 0"),
    ("optim.min_lr_ratio=.nan", "optim.min_lr_ratio must be a finite number"),
    ("lora.dropout=5", "lora.dropout must be in [0, 1)"),
    ("lora.r=0", "lora.r must be >= 1"),
    ("lora.targets=[qkv]", "lora.targets: unknown module names"),
    ("ema.decay=.nan", "ema.decay must be a finite number"),
    ("gduf.mse_weight=.nan", "gduf.mse_weight must be a finite number"),
    ("gduf.det_weight=-1", "gduf.det_weight must be >= 0"),
    ("gduf.timestep_shift=0", "gduf.timestep_shift must be > 0"),
    ("data.packing.max_num_tokens=0", "data.packing.max_num_tokens must be >= 1"),
    ("data.packing.expected_num_tokens=99999", "data.packing.expected_num_tokens must be in [1, 1500]"),
    ("data.sources.t2i.weight=.inf", "data.sources.t2i.weight must be a finite number"),
    ("data.sources.t2i.heldout_fraction=1", "data.sources.t2i.heldout_fraction must be in [0, 1)"),
    ("data.cfg_dropout.text=1.5", "data.cfg_dropout.text must be in [0, 1]"),
    ("data.vae_transform.stride=0", "data.vae_transform.stride must be >= 1"),
    ("data.max_bad_fraction=.nan", "data.max_bad_fraction must be a finite number"),
    ("data.prefetch_factor=0", "data.prefetch_factor must be >= 1"),
    ("model.llm.rms_norm_eps=0", "model.llm.rms_norm_eps must be > 0"),
    ("model.llm.num_key_value_heads=0", "model.llm.num_key_value_heads must be >= 1"),
    ("model.vae.scaling_factor=.inf", "model.vae.scaling_factor must be a finite number"),
    ("checkpoint.keep_last_k=0", "checkpoint.keep_last_k must be >= 1"),
    ("deepspeed.gradient_accumulation_steps=0", "deepspeed.gradient_accumulation_steps must be >= 1"),
    ("guard.max_consecutive_skips=0", "guard.max_consecutive_skips must be >= 1"),
    ("guard.loss_spike_factor=.nan", "guard.loss_spike_factor must be a finite number"),
    ("guard.loss_spike_factor=0.5", "guard.loss_spike_factor must be 0 (off) or > 1"),
    ("guard.loss_spike_warmup=500", "guard.loss_spike_warmup must be in [1, 100]"),
    ("preemption.signals=[SIGKILL]", "preemption.signals: 'SIGKILL' is not a signal name"),
    ("seed=-1", "seed must be in [0, 4294967295]"),
])
def test_out_of_range_and_non_finite_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(str(REPO / "configs/train/gduf_demo.yaml"), [override])
    assert message in str(err.value)


def test_missing_input_files_are_config_errors_naming_the_key(tmp_path):
    cfg = load_train_config(str(REPO / "configs/train/gduf_demo.yaml"),
                            [f"data.sources.fakeclue.json_path={tmp_path / 'absent.json'}"])
    with pytest.raises(ConfigError, match=r"data\.sources\.fakeclue\.json_path: no such file"):
        cfg.check_inputs()
