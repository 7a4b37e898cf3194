"""One prepared GPU check: attention kernels against SDPA, a bf16 training step against fp32, and the
training-step benchmark on a 4-layer slice of BAGEL-7B. Prints one summary table.

    python benchmarks/gpu_check.py --json gpu_check.json             # one CUDA GPU, about 6 minutes
    python benchmarks/gpu_check.py --dry-run --json gpu_check_dry.json    # the same code paths on CPU, tiny, fp32

The dry run (seconds, for CI) uses the tiny geometry, fp32 candidates against an fp64 reference, bf16
for the precision check, and skips flash and flex, which need CUDA. Without ``--dry-run`` and without a
visible CUDA device the script exits 2.

Checks, in order (``--checks`` picks a subset):

- ``flash``: the ``flash`` backend (flash-attn varlen over the split decomposition) against the ``sdpa``
  backend on a 16K-token pack of SMSA detection and text-to-image samples laid out by the packer, at
  BAGEL-7B's attention geometry (28 query heads, 4 KV heads, head dim 128), bf16, output and the input
  gradients dq/dk/dv for one fixed upstream gradient.
- ``varlen-ref``: the split decomposition with the pure-PyTorch stand-in kernel, same comparison. It
  separates a decomposition error from a kernel error when ``flash`` fails, and is what exercises the
  comparison code on CPU.
- ``precision``: one training step (VAE encode, forward, backward) of the tiny model in bf16 against the
  same step in fp32 (TF32 off): same weights, pack and noise; loss, gradient norm, and the gradient
  cosine per parameter group.
- ``bench``: ``benchmarks/train_step.py`` on BAGEL-7B with 4 LLM layers and a 16K-token pack, without and
  with activation checkpointing: tokens/s, MFU against the measured bf16 matmul peak, peak GPU memory;
  and a row checking that activation checkpointing lowers peak memory. The backend is flash when
  flash-attn imports, else sdpa (``--bench-backend`` forces one); if the automatically chosen flash
  fails, that is an ERROR row and the figures are measured with sdpa in the same run.
- ``flex``: the ``flex`` backend (compiled ``flex_attention`` with one BlockMask), same comparison as
  ``flash``. Last, because it compiles its forward and backward kernels first and is the slowest to start.

On a GPU each check runs in its own process (``--check-timeout-s``, 240 s by default): a check still running at
its timeout prints every thread's Python stack to stderr, is stopped with its process group, and becomes an
ERROR row; the next check still runs. The dry run keeps every check in one process unless asked otherwise.

Tolerances (``--tolerance-scale`` multiplies all of them; 0 forces failures, for testing the exit path):

- attention: for each of out, dq, dk, dv, both
    max|candidate - ref| <= 3 x max|sdpa - ref| + 2 ulp x max|ref|   and
    |candidate - ref| / |ref| <= 3 x |sdpa - ref| / |ref| + 1 ulp    (Frobenius norms),
  where ref is the sdpa backend on the same inputs in fp32 (fp64 in the dry run; SDPA's math kernel,
  TF32 off) and candidate and sdpa run in bf16 (fp32). The sdpa error is the measured rounding floor
  of that precision on that device; the ulp terms leave room for a kernel that rounds in other places
  (flash-attn rounds the per-query-head dk/dv of grouped-query attention to bf16 before summing them,
  and the split decomposition adds the causal and the full group's key gradients in bf16). A wrong
  mask or scale errs by O(1) on the affected tokens: the elementwise measure sees it where outputs are
  large (short contexts), the Frobenius one where they are small but many (long contexts).
- precision: |loss_bf16 - loss_fp32| / loss_fp32 <= 5e-3; the same for the global gradient norm <= 2e-2;
  1 - cosine(grad_bf16, grad_fp32) <= 1e-2 for every parameter group. bf16 rounding alone gave 1e-5,
  1.6e-3 and 5e-4 (detection head, the worst group) for this step on CPU, so the margins are 10-500x:
  wide enough for another device's kernels, narrow enough that an op silently kept in bf16 where it
  needs fp32 (or a cast that drops a gradient) shows.

Every check is guarded: an exception becomes an ERROR row and the remaining checks still run. A check
that would start after ``--budget-s`` seconds is skipped. Exit status 0 when every row is PASS or SKIP,
1 when any row is FAIL or ERROR, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import gc
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import train_step
from check_report import (
    ERROR,
    FAIL,
    PASS,
    SKIP,
    CheckOutcome,
    ErrorBound,
    Row,
    bounded_error,
    cosine,
    exit_code,
    relative_difference,
    render_table,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from unigendet.config.loader import load_config
from unigendet.models.config import ModelConfig
from unigendet.models.mot import GEN_SUFFIX
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import GDUFLossConfig, GDUFObjective
from unigendet.ops.attention import PackedLayout, build_attention, reference_varlen_kernel
from unigendet.profiling.random_packs import synthetic_pack

REPO = Path(__file__).resolve().parents[1]
BAGEL = REPO / "configs/model/bagel-7b-mot.yaml"
TINY = REPO / "configs/model/tiny.yaml"
# Compiled flex runs last: it compiles forward and backward kernels before its first step, and on its first H200 run
# it had not finished after 390 s, which then left no time for the checks behind it.
CHECKS = ("flash", "varlen-ref", "precision", "bench", "flex")
# Each check runs in its own process on a GPU: a check that hangs (a compile that never ends, a stuck kernel) is
# stopped after this many seconds, its Python stacks printed, and becomes an ERROR row; the others still run.
GPU_CHECK_TIMEOUT_S = 240.0
# Extra time the parent waits beyond the child's own deadline before killing its process group outright.
KILL_GRACE_S = 60.0
CHILD_MARKER = "[gpu_check child outcome] "
# Samples are added until the target is reached: at 512 px this gives 16,200 tokens (5 SMSA detection
# and 4 text-to-image samples), the closest whole-sample pack to 16K.
PACK_TOKENS = 16000

ATTN_FACTOR = 3.0  # candidate error may be this many times the sdpa error at the same precision
ATTN_MAX_ULPS = 2.0  # plus this many ulps of the largest reference value (elementwise measure)
ATTN_REL_ULPS = 1.0  # plus this many ulps (relative Frobenius measure)
LOSS_REL_TOL = 5e-3
GRAD_NORM_REL_TOL = 2e-2
GRAD_COSINE_TOL = 1e-2  # on 1 - cosine


@dataclass(frozen=True)
class Plan:
    """Sizes and precisions of one run: the GPU plan or the dry-run plan."""

    device: torch.device
    dtype: torch.dtype  # the precision under test
    attn_model: Path
    attn_tokens: int
    attn_image: int
    precision_tokens: int
    precision_image: int
    bench_model: Path
    bench_layers: int
    bench_tokens: int
    bench_image: int
    bench_steps: int
    bench_warmup: int

    @property
    def reference_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float32 else torch.float32


def gpu_plan() -> Plan:
    """BAGEL-7B attention geometry and a 16K-token pack of 512-px images; the tiny model for bf16 vs fp32."""
    return Plan(device=torch.device("cuda"), dtype=torch.bfloat16,
                attn_model=BAGEL, attn_tokens=PACK_TOKENS, attn_image=512,
                precision_tokens=2048, precision_image=64,
                bench_model=BAGEL, bench_layers=4, bench_tokens=PACK_TOKENS, bench_image=512,
                bench_steps=5, bench_warmup=2)


def dry_run_plan() -> Plan:
    """The same checks on CPU at the tiny geometry, fp32 against an fp64 reference, in seconds."""
    return Plan(device=torch.device("cpu"), dtype=torch.float32,
                attn_model=TINY, attn_tokens=512, attn_image=64,
                precision_tokens=256, precision_image=32,
                bench_model=TINY, bench_layers=2, bench_tokens=192, bench_image=32, bench_steps=1, bench_warmup=1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32, so the fp32 step is a true fp32 reference."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# Attention parity


@dataclass
class AttentionInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    scale: float


@dataclass
class AttentionRun:
    out: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class AttentionFixture:
    """The pack layout, the inputs, and the sdpa runs every candidate is compared with."""

    layout: PackedLayout
    inputs: AttentionInputs
    reference: AttentionRun  # sdpa in the reference precision
    baseline: AttentionRun  # sdpa in the precision under test
    description: str


def attention_inputs(cfg: ModelConfig, length: int, seed: int = 0) -> AttentionInputs:
    """Standard-normal q/k/v at the model's head geometry and one fixed upstream gradient, drawn on the
    CPU so every device sees the same numbers."""
    llm = cfg.llm
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, llm.num_attention_heads, llm.head_dim, generator=g)
    k = torch.randn(length, llm.num_key_value_heads, llm.head_dim, generator=g)
    v = torch.randn(length, llm.num_key_value_heads, llm.head_dim, generator=g)
    dout = torch.randn(length, llm.num_attention_heads, llm.head_dim, generator=g)
    return AttentionInputs(q, k, v, dout, llm.head_dim**-0.5)


def run_attention(backend, layout: PackedLayout, inputs: AttentionInputs, device: torch.device,
                  dtype: torch.dtype) -> AttentionRun:
    """Forward and input gradients of one backend on the pack, in ``dtype``."""
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    out = backend(q, k, v, backend.prepare(layout, device), scale=inputs.scale)
    grads = torch.autograd.grad(out, (q, k, v), inputs.dout.to(device=device, dtype=dtype))
    return AttentionRun(out.detach(), tuple(g.detach() for g in grads))


def build_attention_fixture(plan: Plan) -> AttentionFixture:
    cfg = load_config(ModelConfig, str(plan.attn_model))
    batch = synthetic_pack(cfg, plan.attn_tokens, plan.attn_image)
    layout = batch.layout
    inputs = attention_inputs(cfg, layout.total_len)
    sdpa = build_attention("sdpa")
    # The math kernel without TF32 is a true fp32 (fp64) computation; fused kernels may not offer fp32.
    with exact_fp32(), sdpa_kernel(SDPBackend.MATH):
        reference = run_attention(sdpa, layout, inputs, plan.device, plan.reference_dtype)
    baseline = run_attention(sdpa, layout, inputs, plan.device, plan.dtype)
    llm = cfg.llm
    description = (f"{layout.total_len} tokens, {len(layout.sample_lens)} samples, {len(layout.split_lens)} splits, "
                   f"{llm.num_attention_heads}/{llm.num_key_value_heads} heads x {llm.head_dim}")
    return AttentionFixture(layout, inputs, reference, baseline, description)


def attention_tolerance_text(plan: Plan, scale: float) -> str:
    f = ATTN_FACTOR * scale
    return (f"max {f:g}x sdpa + {ATTN_MAX_ULPS * scale:g} ulp*max|ref|, rel {f:g}x sdpa + "
            f"{ATTN_REL_ULPS * scale:g} ulp; {dtype_name(plan.reference_dtype)} ref")


def bound_row(name: str, bounds: list[ErrorBound], tolerance: str, context: str) -> Row:
    worst = max(bounds, key=lambda b: b.ratio)
    value = (f"{worst.tensor} max {worst.max_err:.1e} (sdpa {worst.baseline_max_err:.1e}), rel {worst.rel_err:.1e} "
             f"(sdpa {worst.baseline_rel_err:.1e}): {worst.ratio:.2f} of allowed")
    failed = [b.tensor for b in bounds if not b.ok]
    details = {"pack": context, **{b.tensor: b.to_dict() for b in bounds}}
    if failed:
        return Row(name, value, tolerance, FAIL, f"over tolerance: {', '.join(failed)}", details)
    return Row(name, value, tolerance, PASS, "", details)


def attention_rows(label: str, candidate: AttentionRun, fixture: AttentionFixture, plan: Plan,
                   scale: float) -> list[Row]:
    ulp = torch.finfo(plan.dtype).eps
    ref, base = fixture.reference, fixture.baseline

    def bound(name, c, b, r):
        return bounded_error(name, c, b, r, ATTN_FACTOR, ulp, ATTN_MAX_ULPS, ATTN_REL_ULPS, scale)

    forward = [bound("out", candidate.out, base.out, ref.out)]
    backward = [bound(n, c, b, r) for n, c, b, r in zip(("dq", "dk", "dv"), candidate.grads, base.grads, ref.grads)]
    tolerance = attention_tolerance_text(plan, scale)
    return [bound_row(f"{label} vs sdpa: fwd", forward, tolerance, fixture.description),
            bound_row(f"{label} vs sdpa: bwd", backward, tolerance, fixture.description)]


# --------------------------------------------------------------------------------------------------
# bf16 against fp32 training step


def parameter_group(name: str) -> str:
    """Top-level module, with the language model split into its understanding and generation experts."""
    top = name.split(".")[0]
    if top == "language_model":
        return "llm gen expert" if GEN_SUFFIX in name else "llm und + embeddings"
    return top


@dataclass
class StepResult:
    loss: float
    parts: dict[str, float]
    grads: dict[str, torch.Tensor]


def step_gradients(model: UniGenDet, vae: FluxVAE, cfg: ModelConfig, batch, device: torch.device) -> StepResult:
    """Loss and parameter gradients of one GDUF step, with a fixed noise seed."""
    objective = GDUFObjective(GDUFLossConfig(), vae, cfg.latent_patch_size, cfg.detection_loss)
    model.train()
    loss, metrics = objective(model, batch, torch.Generator(device=device).manual_seed(0))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    kept = {n: g.detach().float() for (n, _), g in zip(named, grads) if g is not None}
    parts = {k: float(v) for k, v in metrics.items() if k in ("ce", "mse", "det")}
    return StepResult(float(loss.detach()), parts, kept)


def grouped(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, g in grads.items():
        groups.setdefault(parameter_group(name), []).append(g.flatten())
    return {k: torch.cat(v) for k, v in groups.items()}


def precision_rows(plan: Plan, scale: float) -> list[Row]:
    cfg = load_config(ModelConfig, str(TINY))
    device, low = plan.device, torch.bfloat16
    torch.manual_seed(0)
    model = UniGenDet(cfg)
    with torch.no_grad():
        # llm2vae is zero at a fresh init, which would keep the flow-matching loss from reaching the LLM.
        model.llm2vae.weight.normal_(std=0.02)
    vae = FluxVAE(cfg.vae)
    model_low = copy.deepcopy(model).to(device=device, dtype=low)
    vae_low = copy.deepcopy(vae).to(device=device, dtype=low)
    batch = synthetic_pack(cfg, plan.precision_tokens, plan.precision_image).to(device)
    with exact_fp32():
        ref = step_gradients(model.to(device), vae.to(device), cfg, batch, device)
    got = step_gradients(model_low, vae_low, cfg, batch, device)
    if set(ref.grads) != set(got.grads):
        raise RuntimeError(f"parameters with gradients differ: {sorted(set(ref.grads) ^ set(got.grads))}")

    label = f"{dtype_name(low)} vs fp32 step, tiny {batch.sequence_length} tok"
    loss_rel = relative_difference(got.loss, ref.loss)
    norm_ref = math.sqrt(sum(float(g.double().square().sum()) for g in ref.grads.values()))
    norm_got = math.sqrt(sum(float(g.double().square().sum()) for g in got.grads.values()))
    norm_rel = relative_difference(norm_got, norm_ref)
    ref_groups, got_groups = grouped(ref.grads), grouped(got.grads)
    cosines = {k: cosine(got_groups[k], ref_groups[k]) for k in ref_groups}
    worst_group = min(cosines, key=lambda k: cosines[k] if math.isfinite(cosines[k]) else -math.inf)

    def judged(name, value_text, measured, limit, tolerance_text, details) -> Row:
        ok = measured <= limit  # NaN fails
        return Row(name, value_text, tolerance_text, PASS if ok else FAIL, "" if ok else "over tolerance", details)

    loss_details = {"loss_fp32": ref.loss, "loss_low": got.loss, "parts_fp32": ref.parts, "parts_low": got.parts}
    return [
        judged(f"{label}: loss", f"rel diff {loss_rel:.2e} ({got.loss:.4f} vs {ref.loss:.4f})", loss_rel,
               scale * LOSS_REL_TOL, f"<= {scale * LOSS_REL_TOL:.1e}", loss_details),
        judged(f"{label}: grad norm", f"rel diff {norm_rel:.2e} ({norm_got:.4g} vs {norm_ref:.4g})", norm_rel,
               scale * GRAD_NORM_REL_TOL, f"<= {scale * GRAD_NORM_REL_TOL:.1e}",
               {"grad_norm_fp32": norm_ref, "grad_norm_low": norm_got}),
        judged(f"{label}: grad cosine", f"min {cosines[worst_group]:.5f} ({worst_group})",
               1 - cosines[worst_group], scale * GRAD_COSINE_TOL, f">= {1 - scale * GRAD_COSINE_TOL:.4f} per group",
               {"cosine_per_group": cosines}),
    ]


# --------------------------------------------------------------------------------------------------
# Training-step benchmark


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_backend(plan: Plan, requested: str) -> str:
    if requested != "auto":
        return requested
    if plan.device.type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        return "sdpa"
    return "flash"


def run_train_step(plan: Plan, backend: str, checkpointing: bool) -> dict:
    """``benchmarks/train_step.py``'s own measurement, its JSON line kept out of the table."""
    release_device_memory(plan.device)
    argv = ["--model", str(plan.bench_model), "--layers", str(plan.bench_layers), "--backend", backend,
            "--device", plan.device.type, "--dtype", "bf16" if plan.dtype == torch.bfloat16 else "fp32",
            "--pack-tokens", str(plan.bench_tokens), "--image-size", str(plan.bench_image),
            "--steps", str(plan.bench_steps), "--warmup", str(plan.bench_warmup), "--json"]
    if checkpointing:
        argv.append("--activation-checkpointing")
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_step.main(argv)
    release_device_memory(plan.device)
    return result


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def bench_rows(plan: Plan, requested_backend: str) -> list[Row]:
    backend = bench_backend(plan, requested_backend)
    rows, failure = [], None
    try:
        results = {ac: run_train_step(plan, backend, ac) for ac in (False, True)}
    except Exception as err:
        if requested_backend != "auto" or backend == "sdpa":
            raise
        traceback.print_exc(file=sys.stderr)
        failure = error_text(err)
    if failure is not None:
        # The automatically chosen fast backend failing to train is an error of its own; sdpa still
        # yields the figures in the same run, so one GPU session is not spent on a rerun. This runs
        # outside the except block so that the failed run's frames (and its GPU memory) are released.
        rows.append(Row(f"bench {plan.bench_model.stem} {plan.bench_layers}L {backend}", "-", "-", ERROR,
                        f"{failure}; measured with sdpa instead"))
        backend = "sdpa"
        results = {ac: run_train_step(plan, backend, ac) for ac in (False, True)}
    for ac, r in results.items():
        name = (f"bench {plan.bench_model.stem} {r['layers']}L {r['pack_tokens']} tok {r['backend']} "
                f"AC {'on' if ac else 'off'}")
        memory = f", peak {r['max_memory_gib']:.1f} GiB" if "max_memory_gib" in r else ""
        value = f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%{memory}"
        sane = r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1
        rows.append(Row(name, value, "0 < MFU <= 1", PASS if sane else FAIL,
                        "" if sane else "MFU outside (0, 1]: FLOP count or timing is wrong", r))
    off, on = results[False], results[True]
    name = "bench: AC lowers peak memory"
    if "max_memory_gib" not in off:
        rows.append(Row(name, "-", "AC on < AC off", SKIP, "no CUDA memory statistics on CPU"))
    else:
        lower = on["max_memory_gib"] < off["max_memory_gib"]
        rows.append(Row(name, f"{on['max_memory_gib']:.1f} vs {off['max_memory_gib']:.1f} GiB", "AC on < AC off",
                        PASS if lower else FAIL, "" if lower else "checkpointing did not save memory",
                        {"ac_on_gib": on["max_memory_gib"], "ac_off_gib": off["max_memory_gib"]}))
    return rows


# --------------------------------------------------------------------------------------------------
# Driver


class GPUCheck:
    def __init__(self, plan: Plan, tolerance_scale: float, backend: str):
        self.plan = plan
        self.scale = tolerance_scale
        self.backend = backend
        self._fixture: AttentionFixture | None = None

    def fixture(self) -> AttentionFixture:
        # Built once: the fp32 reference and the bf16 sdpa run serve every attention candidate.
        if self._fixture is None:
            self._fixture = build_attention_fixture(self.plan)
        return self._fixture

    def attention(self, label: str, backend) -> list[Row]:
        fixture = self.fixture()
        candidate = run_attention(backend, fixture.layout, fixture.inputs, self.plan.device, self.plan.dtype)
        return attention_rows(label, candidate, fixture, self.plan, self.scale)

    def flash(self) -> list[Row]:
        name = "flash varlen vs sdpa"
        if self.plan.device.type != "cuda":
            return [Row(name, "-", "-", SKIP, "flash-attn needs a CUDA GPU")]
        try:
            import flash_attn  # noqa: F401
        except (ImportError, OSError) as err:
            return [Row(name, "-", "-", SKIP, f"flash-attn cannot be imported ({err})")]
        return self.attention("flash varlen", build_attention("flash"))

    def flex(self) -> list[Row]:
        if self.plan.device.type != "cuda":
            return [Row("flex compiled vs sdpa", "-", "-", SKIP,
                        "compiled flex_attention needs CUDA (PyTorch has no flex backward on CPU)")]
        return self.attention("flex compiled", build_attention("flex", compile=True))

    def varlen_ref(self) -> list[Row]:
        return self.attention("varlen torch kernel",
                              build_attention("flash", kernel=reference_varlen_kernel))

    def precision(self) -> list[Row]:
        self._fixture = None  # free the attention tensors before building models
        return precision_rows(self.plan, self.scale)

    def bench(self) -> list[Row]:
        self._fixture = None
        return bench_rows(self.plan, self.backend)

    def run(self, name: str) -> list[Row]:
        return getattr(self, name.replace("-", "_"))()


def over_budget(name: str, started: float, budget_s: float) -> CheckOutcome | None:
    """The SKIP outcome of a check that would start after the time budget, else None."""
    if time.perf_counter() - started > budget_s:
        return CheckOutcome(name, [Row(name, "-", "-", SKIP, f"time budget of {budget_s:.0f} s spent")], 0.0)
    return None


def guarded(check: GPUCheck, name: str, started: float, budget_s: float) -> CheckOutcome:
    """Run one check; an exception becomes an ERROR row, a check past the time budget a SKIP row."""
    if skipped := over_budget(name, started, budget_s):
        return skipped
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
    try:
        rows = check.run(name)
    except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
        traceback.print_exc(file=sys.stderr)
        rows = [Row(name, "-", "-", ERROR, error_text(err))]
    seconds = time.perf_counter() - t0
    print(f"[gpu_check] {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return CheckOutcome(name, rows, seconds)


def child_command(name: str, args: argparse.Namespace) -> list[str]:
    """The command that runs one check of this invocation in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-check", name,
           "--tolerance-scale", repr(args.tolerance_scale), "--bench-backend", args.bench_backend,
           "--check-timeout-s", repr(args.check_timeout_s)]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.hang:
        cmd += ["--hang", args.hang]
    return cmd


def isolated(name: str, args: argparse.Namespace, started: float) -> CheckOutcome:
    """Run one check in a child process (its own session, so compile workers die with it). The child prints its
    Python stacks and exits once the check has run for ``--check-timeout-s``; a child that does not even manage
    that is killed ``KILL_GRACE_S`` later. Either way the check is an ERROR row and the next check runs."""
    if skipped := over_budget(name, started, args.budget_s):
        return skipped
    t0 = time.perf_counter()
    proc = subprocess.Popen(child_command(name, args), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=args.check_timeout_s + KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    marker = [line for line in stdout.splitlines() if line.startswith(CHILD_MARKER)]
    other = "\n".join(line for line in stdout.splitlines() if not line.startswith(CHILD_MARKER))
    if other:
        print(other, file=sys.stderr, flush=True)
    if proc.returncode == 0 and marker:
        return CheckOutcome.from_dict(json.loads(marker[-1][len(CHILD_MARKER):]))
    # The child's watchdog exits with status 1 once the check has run for the timeout; its imports come before.
    if proc.returncode == -signal.SIGKILL or (proc.returncode == 1 and seconds >= args.check_timeout_s):
        reason = f"did not finish within {args.check_timeout_s:.0f} s (its Python stacks are on stderr)"
    else:
        reason = f"its process exited with status {proc.returncode} (its output is on stderr)"
    print(f"[gpu_check] {name}: {reason}", file=sys.stderr, flush=True)
    return CheckOutcome(name, [Row(name, "-", "-", ERROR, reason)], seconds)


def run_child(args: argparse.Namespace) -> int:
    """One check in this process, for ``isolated``: faulthandler's watchdog thread, which needs no interpreter
    lock, prints every thread's stack and exits with status 1 when the check outlives its timeout. The outcome goes
    to stdout after a marker."""
    plan = dry_run_plan() if args.dry_run else gpu_plan()
    check = GPUCheck(plan, args.tolerance_scale, args.bench_backend)
    if args.hang == args.child_check:
        setattr(check, args.hang.replace("-", "_"), lambda: time.sleep(10 * args.check_timeout_s + KILL_GRACE_S))
    faulthandler.dump_traceback_later(args.check_timeout_s, exit=True)
    outcome = guarded(check, args.child_check, time.perf_counter(), math.inf)
    faulthandler.cancel_dump_traceback_later()
    print(CHILD_MARKER + json.dumps(outcome.to_dict(), default=str), flush=True)
    return 0


def environment(plan: Plan) -> dict:
    env = {"torch": torch.__version__, "device": "cpu", "dtype": dtype_name(plan.dtype),
           "reference_dtype": dtype_name(plan.reference_dtype)}
    if plan.device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(plan.device)
        env["cuda"] = torch.version.cuda
    try:
        import flash_attn

        env["flash_attn"] = flash_attn.__version__
    except (ImportError, OSError):
        env["flash_attn"] = None
    return env


def parse_checks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    return names


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32 (CI)")
    p.add_argument("--json", type=Path, default=None, help="write the environment and every row here")
    p.add_argument("--checks", type=parse_checks, default=list(CHECKS), help=f"comma list from {', '.join(CHECKS)}")
    p.add_argument("--tolerance-scale", type=non_negative, default=1.0,
                   help="multiply every parity tolerance (testing: 0 makes every parity row fail)")
    p.add_argument("--budget-s", type=non_negative, default=300.0,
                   help="skip the checks that would start after this many seconds")
    p.add_argument("--bench-backend", default="auto", choices=["auto", "sdpa", "flex", "flash"],
                   help="attention backend of the benchmark (auto: flash when importable on CUDA, else sdpa)")
    p.add_argument("--check-timeout-s", type=non_negative, default=None,
                   help=f"run each check in its own process and stop it after this many seconds (default "
                        f"{GPU_CHECK_TIMEOUT_S:.0f} on a GPU; 0 runs the checks in this process, the dry run's default)")
    p.add_argument("--child-check", choices=CHECKS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--hang", choices=CHECKS, default=None, help=argparse.SUPPRESS)  # testing: this check never ends
    args = p.parse_args(argv)
    if args.check_timeout_s is None:
        args.check_timeout_s = 0.0 if args.dry_run else GPU_CHECK_TIMEOUT_S
    if args.hang and not args.check_timeout_s:
        p.error("--hang needs --check-timeout-s > 0 (the check would never end)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run with --dry-run for the CPU path", file=sys.stderr)
        return 2
    if args.child_check:
        return run_child(args)
    plan = dry_run_plan() if args.dry_run else gpu_plan()
    check = GPUCheck(plan, args.tolerance_scale, args.bench_backend)
    env = environment(plan)
    print(f"[gpu_check] {'dry run, ' if args.dry_run else ''}{env}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    if args.check_timeout_s:
        outcomes = [isolated(name, args, started) for name in args.checks]
    else:
        outcomes = [guarded(check, name, started, args.budget_s) for name in args.checks]
    total = time.perf_counter() - started
    code = exit_code(outcomes)
    print(render_table(outcomes))
    print(f"total {total:.1f} s; {'FAILED' if code else 'passed'} "
          f"(device {env['device']}, {env['dtype']} vs {env['reference_dtype']} reference)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"dry_run": args.dry_run, "environment": env, "tolerance_scale": args.tolerance_scale,
                  "total_s": total, "exit_code": code, "checks": [o.to_dict() for o in outcomes]}
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
