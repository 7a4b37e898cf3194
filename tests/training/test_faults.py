"""Fault injection on real (tiny, CPU) training runs: non-finite losses, divergence, preemption, a kill during a
save, a truncated checkpoint file, a full disk. Each test checks what is kept (nothing lost beyond the documented
boundary), the message, and that resuming continues exactly where resuming applies.

Faults are injected by a driver script (``DRIVER`` below) that patches one function before calling the command
line, so every run is a real subprocess like a launch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

from unigendet.checkpoint.manager import CheckpointConfig, CheckpointManager
from unigendet.demo.data import make_demo_dataset
from unigendet.training.preemption import EXIT_PREEMPTED

RECIPE = REPO / "configs" / "train" / "gduf_demo.yaml"
SHORT = ["total_steps=6", "checkpoint.interval=2", "checkpoint.keep_last_k=3", "checkpoint.export_final=false"]

DRIVER = r'''
import errno, os, signal, sys

kind, _, arg = os.environ.get("FAULT", "").partition(":")
rank = int(os.environ.get("RANK", "0"))
if kind == "nan_loss":
    # nan_loss:FIRST:LAST:RANK -- the loss value of micro-steps FIRST..LAST (1-based) on RANK ("*": all) is NaN;
    # the NaN is added to a detached copy, so the gradients stay finite and only the trainer's guard can skip.
    from unigendet.objectives.gduf import GDUFObjective

    first, last, which = arg.split(":")
    original, calls = GDUFObjective.__call__, [0]

    def patched(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        calls[0] += 1
        if int(first) <= calls[0] <= int(last) and which in ("*", str(rank)):
            loss = loss + loss.detach() * float("nan")
            metrics["loss"] = loss.detach()
        return loss, metrics

    GDUFObjective.__call__ = patched
elif kind == "spike_loss":
    # spike_loss:STEP -- micro-step STEP's loss (and so its gradients) is 1000x the true one, on every rank.
    from unigendet.objectives.gduf import GDUFObjective

    original, calls = GDUFObjective.__call__, [0]

    def patched(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == int(arg):
            loss = loss * 1000.0
            metrics["loss"] = loss.detach()
        return loss, metrics

    GDUFObjective.__call__ = patched
elif kind in ("kill_in_save", "enospc_in_save"):
    # The checkpoint writer dies (SIGKILL after its first file) or finds the disk full, for paths containing ARG.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.save

    def patched(self, state_dict, path):
        if arg in str(path):
            if kind == "kill_in_save":
                original(self, state_dict, path)
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(self, state_dict, path)

    TorchCheckpointEngine.save = patched

from unigendet.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=48, num_heldout=8, image_size=64, seed=0)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One training launch: ``nproc`` rank processes started directly (each its own process group, as a
    scheduler sees them), logs in files."""

    def __init__(self, driver: Path, ckpt: Path, demo, overrides: list[str], nproc: int = 1, fault: str = ""):
        self.ckpt = ckpt
        args = [sys.executable, str(driver), "train", "--config", str(RECIPE),
                f"data.sources.fakeclue.json_path={demo.train_json}",
                f"data.sources.fakeclue.image_root={demo.image_root}",
                f"data.sources.t2i.data_files=[{demo.t2i_parquet}]", f"checkpoint.dir={ckpt}", "logging.interval=1",
                "logging.progress_bar=never", *overrides]
        port = str(_free_port())
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        self.logs = [ckpt.parent / f"{ckpt.name}.{time.monotonic_ns()}.rank{r}.log" for r in range(nproc)]
        self.procs = []
        for r in range(nproc):
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "FAULT": fault, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            with self.logs[r].open("w") as log:
                self.procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)

    def output(self, r: int = 0) -> str:
        return self.logs[r].read_text()


def train(driver, ckpt, demo, overrides, nproc=1, fault="", expect=(0,)) -> Run:
    run = Run(driver, ckpt, demo, overrides, nproc, fault)
    codes = run.wait()
    assert set(codes) <= set(expect), f"exit codes {codes}, expected {expect}:\n{run.output()[-6000:]}"
    return run


def metrics(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(reference: list[dict], resumed: list[dict], steps) -> None:
    by_step = {h["step"]: h for h in resumed}
    for ref in reference:
        if ref["step"] in steps:
            for key in ("loss", "ce", "mse", "det"):
                assert by_step[ref["step"]][key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (ref["step"], key)


def assert_logged_once(ckpt: Path, last: int) -> None:
    assert [h["step"] for h in metrics(ckpt)] == list(range(1, last + 1))


def verify(ckpt: Path, step: int) -> str | None:
    return CheckpointManager(CheckpointConfig(dir=str(ckpt))).verify(ckpt / f"step_{step:07d}")


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a DeepSpeed checkpoint file (the test's own files: trusted), by its nested key."""
    found: dict[str, torch.Tensor] = {}

    def walk(node, key):
        if isinstance(node, torch.Tensor):
            found[key] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")

    walk(torch.load(path, map_location="cpu", weights_only=False), "")
    return found


def assert_same_weights_and_optimizer(older: Path, newer: Path) -> None:
    files = sorted(p.name for p in older.glob("*.pt"))
    assert files and files == sorted(p.name for p in newer.glob("*.pt"))
    for name in files:
        a, b = saved_tensors(older / name), saved_tensors(newer / name)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, driver, demo) -> Path:
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    train(driver, ckpt, demo, SHORT)
    return ckpt


def test_non_finite_loss_skips_steps_then_stops_without_export(tmp_path, driver, demo):
    """Loss NaN from step 3 on (gradients finite, so only the guard can catch it): steps 3.. are skipped with
    parameters and optimizer state untouched and the schedule moving on; the third skip in a row stops the
    run (rc 1, the error names the step and the setting); no final model; the last checkpoint keeps the counters."""
    ckpt = tmp_path / "ckpt"
    run = train(driver, ckpt, demo, ["total_steps=12", "checkpoint.interval=2", "checkpoint.keep_last_k=5",
                                     "guard.max_consecutive_skips=3"], fault="nan_loss:3:99:*", expect=(1,))
    out = run.output()
    assert "training stopped at step 5: 3 optimizer steps in a row were skipped" in out
    assert "guard.max_consecutive_skips=3" in out and "step 3 skipped" in out
    history = metrics(ckpt)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["skipped_steps"] for h in history] == [0, 0, 1, 2, 3]
    assert all(h["loss"] != h["loss"] for h in history[2:])  # NaN
    assert [h["lr"] for h in history] == pytest.approx([1e-3 * (k + 1) / 10 for k in range(1, 6)])
    assert not (ckpt / "final").exists()
    assert verify(ckpt, 4) is None
    assert json.loads((ckpt / "step_0000004" / "trainer_state.json").read_text())["guard"]["skipped_steps"] == 2
    assert_same_weights_and_optimizer(ckpt / "step_0000002", ckpt / "step_0000004")


@pytest.mark.parametrize("guard, message", [
    ("guard.max_consecutive_skips=3", r"3 optimizer steps in a row were skipped \(last loss [0-9.e+]+, gradient norm "
                                      r"inf\) \(guard.max_consecutive_skips=3\)"),
    ("guard.loss_spike_warmup=1 guard.on_spike=stop",
     r"x the median [0-9.]+ of the last 1 applied steps \(guard.loss_spike_factor=10\)"),
    # Skipping spikes does not hide a real divergence: every later step spikes or overflows, and the skips stop it.
    ("guard.loss_spike_warmup=1 guard.on_spike=skip guard.max_consecutive_skips=3",
     r"3 optimizer steps in a row were skipped"),
])
def test_divergence_stops_the_run_without_export(tmp_path, driver, demo, guard, message):
    """lr=1000: after one huge update the gradient norm is inf every step (DeepSpeed's own overflow skip, counted
    by the guard) and the loss jumps by orders of magnitude (the spike check, once it has a median)."""
    ckpt = tmp_path / "ckpt"
    run = train(driver, ckpt, demo, ["total_steps=20", "checkpoint.interval=2", "optim.lr=1000", *guard.split()],
                expect=(1,))
    out = run.output()
    assert "training stopped at step" in out and re.search(message, out), out[-2000:]
    assert not (ckpt / "final").exists()
    assert len(metrics(ckpt)) < 20


def test_a_loss_spike_stops_the_run_or_skips_one_step_with_on_spike_skip(tmp_path, driver, demo):
    """Step 4's loss is 1000x too large (a batch the model gets badly wrong). With ``guard.on_spike=stop`` (the
    library default) the run stops before that update; with ``skip`` (the demo recipe's) exactly that step is
    skipped (parameters and optimizer state as after step 3) and the run finishes and exports."""
    common = ["total_steps=6", "checkpoint.keep_last_k=6", "guard.loss_spike_warmup=2"]
    stopped = train(driver, tmp_path / "stop", demo, [*common, "checkpoint.interval=100", "guard.on_spike=stop"],
                    fault="spike_loss:4",
                    expect=(1,))
    assert re.search(r"training stopped at step 4: loss [0-9.e+]+ is [0-9.]+x the median", stopped.output())
    assert not (tmp_path / "stop" / "final").exists()
    ckpt = tmp_path / "skip"
    run = train(driver, ckpt, demo, [*common, "checkpoint.interval=1", "guard.on_spike=skip"], fault="spike_loss:4")
    assert re.search(r"step 4 skipped \(loss [0-9.e+]+ is [0-9.]+x the median", run.output())
    assert [h["skipped_steps"] for h in metrics(ckpt)] == [0, 0, 0, 1, 1, 1]
    assert (ckpt / "final").exists()
    assert_same_weights_and_optimizer(ckpt / "step_0000003", ckpt / "step_0000004")


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(tmp_path, driver, demo):
    """SIGTERM to rank 0's process group only (its DataLoader worker included): both ranks agree, save the step
    they are in, exit with EXIT_PREEMPTED; the resumed run logs every step once, with the uninterrupted losses."""
    common = ["total_steps=10", "checkpoint.interval=100", "checkpoint.export_final=false", "optim.warmup_steps=2"]
    full = train(driver, tmp_path / "full", demo, common, nproc=2)
    run = Run(driver, tmp_path / "split", demo, common, nproc=2)
    jsonl = run.ckpt / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (jsonl.is_file() and any(json.loads(line)["step"] >= 2 for line in jsonl.read_text().splitlines())):
        assert time.monotonic() < deadline and run.procs[0].poll() is None, run.output()[-4000:]
        time.sleep(0.05)
    os.killpg(run.procs[0].pid, signal.SIGTERM)
    codes = run.wait()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], run.output()[-6000:]
    assert "received SIGTERM" in run.output(0) and "received SIGTERM" not in run.output(1)
    saved = sorted(p.name for p in run.ckpt.glob("step_*"))
    assert len(saved) == 1, saved
    step = int(saved[0].split("_")[1])
    assert 2 <= step < 10 and verify(run.ckpt, step) is None
    assert f"preempted: stopped after step {step}" in run.output(0)
    assert max(h["step"] for h in metrics(run.ckpt)) == step
    train(driver, tmp_path / "split", demo, common, nproc=2)
    assert_logged_once(run.ckpt, 10)
    assert_same_losses(metrics(full.ckpt), metrics(run.ckpt), range(step + 1, 11))


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_skips_the_step_on_both(tmp_path, driver, demo):
    """Rank 1's loss is NaN at step 3 only (its gradients finite): both ranks skip it (each rank's ZeRO-2
    partition of weights and optimizer state stays as after step 2), then training goes on."""
    ckpt = tmp_path / "ckpt"
    train(driver, ckpt, demo, ["total_steps=4", "checkpoint.interval=1", "checkpoint.keep_last_k=4",
                               "checkpoint.export_final=false"], nproc=2, fault="nan_loss:3:3:1")
    assert [h["skipped_steps"] for h in metrics(ckpt)] == [0, 0, 1, 1]
    assert_same_weights_and_optimizer(ckpt / "step_0000002", ckpt / "step_0000003")


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, driver, demo, reference):
    """SIGKILL after DeepSpeed wrote the first file of step 4: the temporary directory is ignored (logged) and
    removed by the next save; the resumed run continues from step 2 exactly."""
    ckpt = tmp_path / "ckpt"
    train(driver, ckpt, demo, SHORT, fault="kill_in_save:step_0000004", expect=(-signal.SIGKILL,))
    assert (ckpt / "step_0000004.tmp").is_dir() and not (ckpt / "step_0000004").exists()
    out = train(driver, ckpt, demo, SHORT).output()
    assert f"ignoring {ckpt / 'step_0000004.tmp'}: a save that did not finish" in out
    assert f"resumed from {ckpt / 'step_0000002'}" in out
    assert not (ckpt / "step_0000004.tmp").exists() and verify(ckpt, 4) is None
    assert_logged_once(ckpt, 6)
    assert_same_losses(metrics(reference), metrics(ckpt), range(3, 7))


def test_truncated_file_in_the_newest_checkpoint_falls_back_and_names_it(tmp_path, driver, demo, reference):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference, ckpt)
    torn = ckpt / "step_0000006" / "mp_rank_00_model_states.pt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    out = train(driver, ckpt, demo, SHORT).output()
    assert f"checkpoint {ckpt / 'step_0000006'} fails its check: mp_rank_00_model_states.pt has" in out
    assert f"resumed from {ckpt / 'step_0000004'}" in out
    assert verify(ckpt, 6) is None  # saved again, replacing the torn one
    assert_logged_once(ckpt, 6)
    assert_same_losses(metrics(reference), metrics(ckpt), range(5, 7))


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, driver, demo, reference):
    ckpt = tmp_path / "ckpt"
    out = train(driver, ckpt, demo, SHORT, fault="enospc_in_save:step_0000004", expect=(1,)).output()
    assert f"could not write the checkpoint of step 4 to {ckpt / 'step_0000004.tmp'}" in out
    assert "No space left on device" in out and f"{ckpt / 'step_0000002'}, is intact" in out
    assert verify(ckpt, 2) is None
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000002"]
    train(driver, ckpt, demo, SHORT)
    assert_logged_once(ckpt, 6)
    assert_same_losses(metrics(reference), metrics(ckpt), range(3, 7))
