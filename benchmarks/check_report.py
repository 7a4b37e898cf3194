"""Error measures and the summary table of ``benchmarks/gpu_check.py`` (plain PyTorch, no project imports).

Parity is judged against a higher-precision reference computed from the same inputs: a candidate
kernel run in low precision may be off from the reference by a few times what the baseline kernel
(SDPA) in the same low precision is off, plus a unit or two in the last place. The baseline's own
error is the measured noise floor of that precision on that device, so no absolute tolerance has to
be guessed per GPU, dtype or input size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

PASS, FAIL, SKIP, ERROR = "PASS", "FAIL", "SKIP", "ERROR"


@dataclass
class Row:
    """One line of the summary table. ``value`` and ``tolerance`` are already formatted for reading;
    ``details`` keeps the raw numbers for the JSON file."""

    name: str
    value: str
    tolerance: str
    status: str
    reason: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckOutcome:
    """The rows one guarded check produced and how long it took."""

    check: str
    rows: list[Row]
    seconds: float

    def to_dict(self) -> dict:
        return {"check": self.check, "seconds": self.seconds, "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> CheckOutcome:
        """The inverse of ``to_dict`` (a check run in another process reports this way)."""
        return cls(d["check"], [Row(**r) for r in d["rows"]], d["seconds"])


def _ratio(err: float, allowed: float) -> float:
    if not math.isfinite(err):
        return math.inf
    if allowed > 0:
        return err / allowed
    return 0.0 if err == 0 else math.inf


@dataclass
class ErrorBound:
    """Errors of a candidate and of the baseline against the reference, and the allowed errors.

    Two measures: the largest elementwise error (catches a wrong value at a few positions) and the
    relative Frobenius error ``|x - ref| / |ref|`` (catches a small error spread over many positions,
    e.g. long-context tokens whose outputs are small next to the largest one)."""

    tensor: str
    max_err: float
    baseline_max_err: float
    reference_absmax: float
    allowed_max: float
    rel_err: float
    baseline_rel_err: float
    allowed_rel: float
    mean_err: float
    baseline_mean_err: float

    @property
    def ok(self) -> bool:
        # NaN compares False, so a non-finite candidate fails.
        return self.max_err <= self.allowed_max and self.rel_err <= self.allowed_rel

    @property
    def ratio(self) -> float:
        """The larger of error over allowed error for the two measures: at most 1 passes."""
        return max(_ratio(self.max_err, self.allowed_max), _ratio(self.rel_err, self.allowed_rel))

    def to_dict(self) -> dict:
        return asdict(self)


def _relative(diff: torch.Tensor, ref_norm: float) -> float:
    return float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())


def bounded_error(tensor: str, candidate: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor,
                  factor: float, eps: float, max_ulps: float = 2.0, rel_ulps: float = 1.0,
                  scale: float = 1.0) -> ErrorBound:
    """Allowed errors, each measured against ``reference``:

    - ``max|x - ref| <= scale * (factor * max|baseline - ref| + max_ulps * eps * max|ref|)``;
    - ``|x - ref| / |ref| <= scale * (factor * |baseline - ref| / |ref| + rel_ulps * eps)``.

    ``eps`` is the machine epsilon of the low precision (one unit in the last place at 1.0); the ulp
    terms keep a near-exact baseline from demanding bit equality of a kernel that rounds in other
    places. ``scale`` 0 demands equality with the reference, which the testing path uses to force a
    failure."""
    ref = reference.detach().double()
    cand_diff = (candidate.detach().double() - ref).abs()
    base_diff = (baseline.detach().double() - ref).abs()
    absmax, ref_norm = float(ref.abs().max()), float(ref.norm())
    cand_max, base_max = float(cand_diff.max()), float(base_diff.max())
    cand_rel, base_rel = _relative(cand_diff, ref_norm), _relative(base_diff, ref_norm)
    return ErrorBound(
        tensor=tensor,
        max_err=cand_max, baseline_max_err=base_max, reference_absmax=absmax,
        allowed_max=scale * (factor * base_max + max_ulps * eps * absmax),
        rel_err=cand_rel, baseline_rel_err=base_rel, allowed_rel=scale * (factor * base_rel + rel_ulps * eps),
        mean_err=float(cand_diff.mean()), baseline_mean_err=float(base_diff.mean()),
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened tensors in float64 (1.0 when both are zero)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def exit_code(outcomes: list[CheckOutcome]) -> int:
    """1 when any row failed or errored, else 0 (skips do not fail the run)."""
    return int(any(r.status in (FAIL, ERROR) for o in outcomes for r in o.rows))


def render_table(outcomes: list[CheckOutcome]) -> str:
    """Fixed-width table: check, measured value, tolerance, seconds, status (with the reason last, so a
    long reason does not push the other columns). The seconds of a check are printed on its first row."""
    header = ("check", "measured", "tolerance", "s", "status")
    lines = []
    for o in outcomes:
        for i, r in enumerate(o.rows):
            status = f"{r.status}: {r.reason}" if r.reason else r.status
            lines.append((r.name, r.value, r.tolerance, f"{o.seconds:.1f}" if i == 0 else "", status))
    widths = [max([len(h)] + [len(line[c]) for line in lines]) for c, h in enumerate(header)]

    def fmt(cells) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [fmt(header), "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * len(header[-1])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)
