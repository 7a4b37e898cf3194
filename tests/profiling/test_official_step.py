"""``benchmarks/official_step.py``: a clear exit without the official code, the ratio / peak-share arithmetic, and
(where the official BAGEL checkout exists in ``refs/``) a tiny dry run whose two steps agree before timing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "official_step.py"
REFERENCE = REPO / "refs" / "Bagel"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("official_step_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_reference_exits_with_a_clear_message(bench, tmp_path, capsys):
    assert bench.main(["--reference", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "official BAGEL code not found" in err and "ByteDance-Seed/Bagel" in err


def test_summary_ratios_and_peak_shares(bench):
    timings = {"ours_s": [2.0, 1.0], "official_s": [3.0, 1.0], "ours_cpu_s": [1.0, 1.0],
               "official_cpu_s": [1.5, 1.2], "peak_flops": [10.0, 20.0], "peak_cpu_flops": [10.0, 10.0]}
    out = bench.summarize(timings, tokens=100, step_flops=8.0)
    assert out["pairs"] == 2
    assert out["wall"]["speed_ratio"] == {"median": 1.25, "min": 1.0, "max": 1.5}
    assert out["wall"]["tokens_per_s_ours"]["max"] == 100.0
    # Achieved FLOP/s over the peak measured right after the same pair: 8/2/10 and 8/1/20.
    assert out["wall"]["peak_share_ours"] == {"median": 0.4, "min": 0.4, "max": 0.4}
    assert out["cpu"]["speed_ratio"]["median"] == pytest.approx(1.35)
    assert out["cpu"]["peak_share_official"]["min"] == pytest.approx(8 / 1.5 / 10)


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE / "modeling" / "bagel" / "bagel.py").is_file(),
                    reason="the official BAGEL code is not cloned into refs/Bagel")
def test_dry_run_against_the_official_code():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loss_rel_diff"] <= 1e-4 and result["grad_norm_rel_diff"] <= 1e-4
    assert result["pairs"] == 1 and result["cpu"]["tokens_per_s_ours"]["median"] > 0
    assert "speed ratio ours/official" in proc.stdout


def test_disagreeing_steps_stop_before_timing(bench):
    import torch

    class Sides:
        def __init__(self, ref_loss):
            self.ours, self.reference = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
            self.reference.load_state_dict(self.ours.state_dict())
            self.ref_loss = ref_loss

        def _step(self, module, loss):
            module.zero_grad()
            module(torch.ones(1, 2)).sum().backward()
            return loss

        def ours_step(self):
            return self._step(self.ours, 1.0)

        def reference_step(self):
            return self._step(self.reference, self.ref_loss)

    assert bench.check_equal(Sides(1.0), 1e-4)["loss_rel_diff"] == 0.0
    with pytest.raises(SystemExit, match="disagree before timing"):
        bench.check_equal(Sides(1.01), 1e-4)
