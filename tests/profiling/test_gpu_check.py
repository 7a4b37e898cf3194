"""``benchmarks/gpu_check.py``: the CPU dry run prints one table and writes JSON, a parity miss exits non-zero,
and one failing check is reported without stopping the others."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    json_path: Path


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, Run]:
    """The full dry run, a zero-tolerance run and a run of checks in their own processes with one that hangs,
    started together (each spends seconds importing torch)."""
    root = tmp_path_factory.mktemp("gpu_check")
    variants = {"full": [], "zero": ["--checks", "varlen-ref", "--tolerance-scale", "0"],
                "isolated": ["--checks", "flash,varlen-ref", "--check-timeout-s", "8", "--hang", "flash"]}
    procs = {}
    for name, extra in variants.items():
        json_path = root / name / "report.json"
        # From a foreign working directory, to prove the config paths do not depend on it.
        procs[name] = (json_path, subprocess.Popen(
            [sys.executable, str(SCRIPT), "--dry-run", "--json", str(json_path), *extra],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    runs = {}
    for name, (json_path, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        runs[name] = Run(proc.returncode, stdout, stderr, json_path)
    return runs


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check


def statuses(report: dict) -> dict[str, list[str]]:
    return {c["check"]: [r["status"] for r in c["rows"]] for c in report["checks"]}


@pytest.mark.slow
def test_dry_run_prints_one_table_and_writes_json(dry_runs):
    proc = dry_runs["full"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert [c.strip() for c in table.splitlines()[0].split(" | ")] == ["check", "measured", "tolerance", "s", "status"]
    assert "SKIP: flash-attn needs a CUDA GPU" in table
    assert "SKIP: compiled flex_attention needs CUDA" in table
    assert "varlen torch kernel vs sdpa: bwd" in table and "bfloat16 vs fp32 step" in table
    assert "total " in table.splitlines()[-1] and "passed" in table.splitlines()[-1]

    report = json.loads(proc.json_path.read_text())
    assert report["dry_run"] is True and report["exit_code"] == 0 and report["total_s"] > 0
    assert report["environment"]["dtype"] == "float32" and report["environment"]["reference_dtype"] == "float64"
    assert statuses(report) == {
        "flash": ["SKIP"], "flex": ["SKIP"], "varlen-ref": ["PASS", "PASS"],
        "precision": ["PASS", "PASS", "PASS"], "bench": ["PASS", "PASS", "SKIP"],
    }
    assert all(c["seconds"] >= 0 for c in report["checks"])
    rows = {r["name"]: r for c in report["checks"] for r in c["rows"]}
    backward = rows["varlen torch kernel vs sdpa: bwd"]["details"]
    # Every gradient is measured, and the fp32 candidate sits near fp32 rounding of the fp64 reference.
    assert set(backward) == {"pack", "dq", "dk", "dv"}
    for t in ("dq", "dk", "dv"):
        assert 0 < backward[t]["max_err"] <= backward[t]["allowed_max"] < 1e-4
        assert 0 < backward[t]["rel_err"] <= backward[t]["allowed_rel"] < 1e-5
    bench = [r for c in report["checks"] if c["check"] == "bench" for r in c["rows"]][:2]
    assert [r["details"]["backend"] for r in bench] == ["sdpa", "sdpa"]
    assert all(r["details"]["tokens_per_s"] > 0 and 0 < r["details"]["mfu"] <= 1 for r in bench)


@pytest.mark.slow
def test_zero_tolerance_fails_with_nonzero_exit(dry_runs):
    proc = dry_runs["zero"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL: over tolerance: out" in proc.stdout and "FAILED" in proc.stdout
    report = json.loads(proc.json_path.read_text())
    assert report["exit_code"] == 1 and statuses(report) == {"varlen-ref": ["FAIL", "FAIL"]}


@pytest.mark.slow
def test_a_hanging_check_is_stopped_with_its_stacks_and_the_next_still_runs(dry_runs):
    proc = dry_runs["isolated"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.json_path.read_text())
    assert statuses(report) == {"flash": ["ERROR"], "varlen-ref": ["PASS", "PASS"]}
    hung = report["checks"][0]
    assert hung["rows"][0]["reason"] == "did not finish within 8 s (its Python stacks are on stderr)"
    assert 8 <= hung["seconds"] < 8 + 60
    # faulthandler's dump names the frame the check was stuck in.
    assert "Timeout (0:00:08)!" in proc.stderr and "in <lambda>" in proc.stderr
    assert "ERROR: did not finish within 8 s" in proc.stdout


def test_a_raising_check_is_an_error_row_and_the_next_still_runs(gpu_check, capsys):
    class Broken(gpu_check.GPUCheck):
        def precision(self):
            raise RuntimeError("boom\nsecond line")

    check = Broken(gpu_check.dry_run_plan(), 1.0, "auto")
    outcomes = [gpu_check.guarded(check, name, started=0.0, budget_s=math.inf) for name in ("precision", "flash")]
    assert [r.status for r in outcomes[0].rows] == ["ERROR"] and outcomes[0].rows[0].reason == "RuntimeError: boom"
    assert [r.status for r in outcomes[1].rows] == ["SKIP"]
    assert gpu_check.exit_code(outcomes) == 1
    assert "ERROR: RuntimeError: boom" in gpu_check.render_table(outcomes)


def test_checks_past_the_budget_are_skipped(gpu_check):
    outcome = gpu_check.guarded(gpu_check.GPUCheck(gpu_check.dry_run_plan(), 1.0, "auto"), "bench",
                                started=-10.0, budget_s=1.0)
    assert outcome.rows[0].status == "SKIP" and "budget" in outcome.rows[0].reason
    assert gpu_check.exit_code([outcome]) == 0


def test_arguments_are_checked(gpu_check, monkeypatch, capsys):
    for bad in (["--checks", "flash,nope"], ["--tolerance-scale", "-1"], ["--tolerance-scale", "nan"],
                ["--dry-run", "--hang", "flash"], ["--check-timeout-s", "-5"]):
        with pytest.raises(SystemExit) as err:
            gpu_check.parse_args(bad)
        assert err.value.code == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_error_bound_uses_the_baseline_floor_and_rejects_nan(gpu_check):
    from check_report import bounded_error

    ref = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=torch.float64)
    base = ref + torch.tensor([1e-3, 0.0, 0.0, 0.0], dtype=torch.float64)
    bound = bounded_error("out", ref + torch.tensor([2e-3, 0, 0, 0]), base, ref, factor=3.0, eps=1e-4)
    assert bound.allowed_max == pytest.approx(3e-3 + 2 * 1e-4 * 2.0)
    assert bound.allowed_rel == pytest.approx(3 * 1e-3 / float(ref.norm()) + 1e-4)
    assert bound.ok and bound.ratio < 1
    # Elementwise: one value off by 5e-3 fails.
    assert not bounded_error("out", ref + torch.tensor([0, 5e-3, 0, 0]), base, ref, 3.0, 1e-4).ok
    # Frobenius: every value off by 2.5e-3 stays under the elementwise bound but fails the relative one.
    spread = bounded_error("out", ref + 2.5e-3, base, ref, 3.0, 1e-4)
    assert spread.max_err <= spread.allowed_max and spread.rel_err > spread.allowed_rel and not spread.ok
    assert not bounded_error("out", ref + 1e-9, base, ref, 3.0, 1e-4, scale=0.0).ok
    nan = bounded_error("out", torch.tensor([float("nan"), -2.0, 0.5, 0.25]), base, ref, 3.0, 1e-4)
    assert not nan.ok and nan.ratio == math.inf


def test_parameter_groups_split_the_experts(gpu_check):
    assert gpu_check.parameter_group("language_model.model.layers.0.mlp_moe_gen.up_proj.weight") == "llm gen expert"
    assert gpu_check.parameter_group("language_model.model.layers.0.mlp.up_proj.weight") == "llm und + embeddings"
    assert gpu_check.parameter_group("vit_model.encoder.layers.0.fc1.weight") == "vit_model"


def test_bench_falls_back_to_sdpa_when_the_auto_backend_fails(gpu_check, monkeypatch):
    # flex cannot train on CPU, standing in for a flash-attn that imports but fails in training.
    monkeypatch.setattr(gpu_check, "bench_backend", lambda plan, requested: "flex")
    monkeypatch.setattr(gpu_check.train_step, "measured_matmul_peak", lambda device, dtype: 1e12)  # saves seconds
    plan = dataclasses.replace(gpu_check.dry_run_plan(), bench_tokens=64, bench_warmup=0)
    rows = gpu_check.bench_rows(plan, "auto")
    assert rows[0].status == "ERROR" and "no backward pass on CPU" in rows[0].reason
    assert "measured with sdpa" in rows[0].reason
    assert [r.status for r in rows[1:]] == ["PASS", "PASS", "SKIP"]
    assert all(r.details["backend"] == "sdpa" for r in rows[1:3])
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        gpu_check.bench_rows(plan, "flex")


def test_bench_rows_on_cuda_figures(gpu_check, monkeypatch):
    """The CUDA-only branches (peak memory, the checkpointing row) with train_step's result faked."""
    def fake(plan, backend, checkpointing):
        return {"layers": 4, "pack_tokens": 16200, "backend": backend, "tokens_per_s": 5000.0,
                "mfu": 1.5 if checkpointing else 0.4, "max_memory_gib": peaks[checkpointing]}

    monkeypatch.setattr(gpu_check, "run_train_step", fake)
    plan = gpu_check.gpu_plan()
    peaks = {False: 60.0, True: 30.0}
    rows = gpu_check.bench_rows(plan, "sdpa")
    assert [r.status for r in rows] == ["PASS", "FAIL", "PASS"]
    assert "peak 60.0 GiB" in rows[0].value and "MFU 40.0%" in rows[0].value and "MFU outside" in rows[1].reason
    assert rows[0].name == "bench bagel-7b-mot 4L 16200 tok sdpa AC off"
    peaks = {False: 30.0, True: 30.0}
    assert gpu_check.bench_rows(plan, "sdpa")[-1].status == "FAIL"


def test_flash_skips_with_reason_when_flash_attn_is_missing(gpu_check, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    check = gpu_check.GPUCheck(gpu_check.gpu_plan(), 1.0, "auto")
    [row] = check.flash()
    assert row.status == "SKIP" and row.reason.startswith("flash-attn cannot be imported")
    assert gpu_check.bench_backend(gpu_check.gpu_plan(), "auto") == "sdpa"


def test_attention_comparison_catches_a_mask_error(gpu_check):
    """A backend that lets samples see each other (one wrong mask rule) fails both rows; sdpa itself passes."""
    from unigendet.ops.attention import PackedLayout

    plan = gpu_check.dry_run_plan()
    fixture = gpu_check.build_attention_fixture(plan)
    sdpa = gpu_check.build_attention("sdpa")

    class SamplesMerged:
        def prepare(self, layout, device):
            return sdpa.prepare(PackedLayout((layout.total_len,), layout.split_lens, layout.attn_modes), device)

        def __call__(self, *args, **kwargs):
            return sdpa(*args, **kwargs)

    def statuses_of(backend):
        run = gpu_check.run_attention(backend, fixture.layout, fixture.inputs, plan.device, plan.dtype)
        return [r.status for r in gpu_check.attention_rows("x", run, fixture, plan, 1.0)]

    assert statuses_of(SamplesMerged()) == ["FAIL", "FAIL"]
    assert statuses_of(sdpa) == ["PASS", "PASS"]
