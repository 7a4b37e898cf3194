"""Sharded, resumable scoring of :class:`~unigendet.evaluation.benchmarks.EvalRecord` lists: each shard appends
its records' outputs to its own file in the job's work directory, a re-run resumes where it stopped, and
:func:`gather` returns every shard's outputs in record order, so metrics do not depend on sharding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unigendet.data.images import load_image_file
from unigendet.data.quality import BadSample
from unigendet.evaluation.benchmarks import EvalRecord
from unigendet.evaluation.detectors import ImageDetector
from unigendet.evaluation.robustness import parse_setting
from unigendet.labels import DetectionResult
from unigendet.metrics.report import jsonable
from unigendet.utils.errors import RunError

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "job.json"
OUTPUTS_FILE = "outputs.jsonl"
COMPLETE_FILE = "COMPLETE.json"


class HarnessError(RunError):
    """The work directory cannot be used as it is."""


class JobMismatchError(HarnessError):
    """A shard directory holds outputs of a job with different settings."""


class IncompleteJobError(HarnessError):
    """Some shards have not finished; the job cannot be gathered yet."""


class NoScorableImagesError(RunError):
    """Not one image of a benchmark could be scored, so every metric would be meaningless."""


# --------------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count``: it owns the positions ``i`` with ``i mod count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: a shard is I/N with N >= 1 and 0 <= I < N")

    @property
    def dirname(self) -> str:
        return shard_dirname(self.index, self.count)

    def owns(self, position: int) -> bool:
        """Whether item ``position`` of a job belongs to this shard (round-robin)."""
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_dirname(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard(text: str) -> ShardSpec:
    """``"I/N"`` -> ShardSpec(I, N)."""
    parts = text.split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers, e.g. 0/4; got {text!r}") from None
    return ShardSpec(index, count)


def resolve_shard(spec: str | ShardSpec | None = None, env: Mapping[str, str] | None = None) -> ShardSpec:
    """The explicit ``spec`` if given, else ``RANK`` / ``WORLD_SIZE`` from the environment, else 0/1."""
    if isinstance(spec, ShardSpec):
        return spec
    if spec:
        return parse_shard(spec)
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return ShardSpec(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]))
    return ShardSpec()


def shard_indices(n_records: int, shard: ShardSpec) -> list[int]:
    """The positions this shard owns (the same rule as :meth:`ShardSpec.owns`)."""
    return list(range(shard.index, n_records, shard.count))


# --------------------------------------------------------------------------------------------------
# Job identity


@dataclass
class JobSpec:
    """One scoring job: ``identity`` holds everything about the benchmark, detector and model that changes
    the outputs (it goes into the fingerprint with the records, the setting and the shard count)."""

    work_dir: str | Path
    identity: dict[str, Any] | None  # None only for gather-only runs, which do not fingerprint
    setting: str = "none"
    perturb_seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        self.perturbation = parse_setting(self.setting)
        self.setting = self.perturbation.name
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def fingerprint(self, records: Sequence[EvalRecord], num_shards: int) -> dict[str, Any]:
        return jsonable({
            "identity": self.identity,
            "setting": self.setting,
            "perturb_seed": self.perturb_seed,
            "num_shards": num_shards,
            "records": records_digest(records),
        })


def records_digest(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """Count and SHA-256 of the (key, label, group, question) list: a changed, re-ordered, re-labelled or
    re-worded benchmark differs."""
    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps([rec.key, rec.label, rec.group, rec.question]).encode() + b"\n")
    return {"n": len(records), "sha256": digest.hexdigest()}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_fingerprint(shard_dir: Path, expected: dict[str, Any]) -> None:
    path = shard_dir / FINGERPRINT_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise JobMismatchError(f"{path} is unreadable ({err}); remove {shard_dir} or pass overwrite") from None
    if stored != expected:
        new, old = _flat(expected), _flat(stored)
        changed = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        raise JobMismatchError(
            f"{shard_dir} holds outputs of a job with different settings (changed: {', '.join(changed)}); "
            "use another output directory or name, or overwrite (--overwrite) to discard them")


# --------------------------------------------------------------------------------------------------
# Output lines


def output_line(index: int, rec: EvalRecord, setting: str, out: DetectionResult | None, error: str | None) -> dict:
    p_fake = None if out is None or not math.isfinite(out.p_fake) else float(out.p_fake)
    line = {
        "index": index, "key": rec.key, "label": rec.label, "group": rec.group, "setting": setting,
        "p_fake": p_fake,
        "text": None if out is None else out.text,
        "text_label": None if out is None else out.text_label,
        "error": error,
    }
    details = getattr(out, "details", None)
    details = details() if callable(details) else None
    if details is not None:  # only detectors with extra per-image fields (a cascade) add the key
        line["details"] = details
    return line


def read_outputs(path: Path, repair: bool = False) -> list[dict]:
    """The complete lines of an outputs file. A last line without its newline (a kill mid-write) is ignored,
    and with ``repair`` cut from the file so appends start on a fresh line. A corrupt complete line raises."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: ignoring a truncated last line (%d bytes)", path, len(data) - end)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
    lines = []
    for lineno, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError as err:
            raise HarnessError(f"{path}:{lineno}: corrupt output line ({err}); remove the shard directory "
                               "or re-run with overwrite") from None
    return lines


def _done_indices(lines: list[dict], records: Sequence[EvalRecord], wanted: set[int], where: Path) -> set[int]:
    done = set()
    for line in lines:
        i = line.get("index")
        if i not in wanted or records[i].key != line.get("key"):
            raise JobMismatchError(f"{where}: output for record {i} ({line.get('key')!r}) does not belong to "
                                   "this shard of this benchmark; remove the shard directory or overwrite")
        done.add(i)
    return done


# --------------------------------------------------------------------------------------------------
# Running a shard


def _load(rec: EvalRecord, job: JobSpec):
    """(perturbed image, None) or (None, error text) for an unreadable record."""
    try:
        image = load_image_file(rec.path)
    except BadSample as bad:
        return None, str(bad)
    return job.perturbation.apply(image, rec.key, job.perturb_seed), None


def _score(detector: ImageDetector, images: list, questions: list) -> list[DetectionResult | str]:
    """Scores of a batch; when the detector rejects the batch (BadSample, e.g. an image too large for the
    context), images are retried one by one and the rejected ones become error strings."""
    try:
        outputs = detector.score(images, questions)
    except BadSample:
        results: list[DetectionResult | str] = []
        for image, question in zip(images, questions):
            try:
                results += detector.score([image], [question])
            except BadSample as bad:
                results.append(str(bad))
        return results
    if len(outputs) != len(images):
        raise HarnessError(f"detector returned {len(outputs)} outputs for {len(images)} images")
    return list(outputs)


def _write_batch(fh, lines: list[dict]) -> None:
    fh.write("".join(json.dumps(line, allow_nan=False) + "\n" for line in lines))
    fh.flush()
    os.fsync(fh.fileno())  # a finished batch survives a kill; only the batch in flight is recomputed


def _prepare_shard_dir(shard_dir: Path, fingerprint: dict, overwrite: bool) -> None:
    if shard_dir.exists() and overwrite:
        try:
            _check_fingerprint(shard_dir, fingerprint)
        except JobMismatchError:
            logger.warning("overwrite: discarding %s", shard_dir)
            shutil.rmtree(shard_dir)
    if (shard_dir / FINGERPRINT_FILE).is_file():
        _check_fingerprint(shard_dir, fingerprint)
        return
    if shard_dir.exists() and any(shard_dir.iterdir()):
        raise JobMismatchError(f"{shard_dir} has files but no {FINGERPRINT_FILE}; remove it or overwrite")
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")


def run_shard(detector: ImageDetector, records: Sequence[EvalRecord], job: JobSpec, shard: ShardSpec,
              overwrite: bool = False) -> dict[str, Any]:
    """Score this shard's records not yet in its outputs file; mark the shard complete. Returns a summary.

    Shard directory ``<work_dir>/shard-IIIII-of-NNNNN/`` holds ``job.json`` (the job's fingerprint),
    ``outputs.jsonl`` (one JSON line per scored record, appended and fsynced per batch) and ``COMPLETE.json``
    (written once every record of the shard is in the outputs). A complete shard is skipped; inside a shard,
    records already in the outputs are; a truncated last line (a kill mid-write) is cut and recomputed.
    The fingerprint names the records, the detector's settings, the weights' hash, the perturbation and the
    shard count (not the batch size: detectors score each image independently of its batch); a shard written
    with a different fingerprint raises :class:`JobMismatchError` unless ``overwrite`` discards it. Unreadable
    images are written as records with an ``error`` and no score, so they are counted and not retried.
    """
    fingerprint = job.fingerprint(records, shard.count)
    shard_dir = job.work_dir / shard.dirname
    _prepare_shard_dir(shard_dir, fingerprint, overwrite)
    wanted = shard_indices(len(records), shard)
    if (shard_dir / COMPLETE_FILE).is_file():
        logger.info("%s: shard %s already complete, skipped", job.work_dir, shard)
        return {"shard": str(shard), "n": len(wanted), "scored": 0, "skipped": True}
    outputs_path = shard_dir / OUTPUTS_FILE
    done = _done_indices(read_outputs(outputs_path, repair=True), records, set(wanted), outputs_path)
    todo = [i for i in wanted if i not in done]
    if done:
        logger.info("%s: shard %s resumes, %d of %d records already scored", job.work_dir, shard, len(done),
                    len(wanted))
    n_errors = 0
    with open(outputs_path, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), job.batch_size):
            lines = _run_batch(detector, records, todo[start : start + job.batch_size], job)
            n_errors += sum(line["error"] is not None for line in lines)
            _write_batch(fh, lines)
            logger.info("%s shard %s: %d / %d", job.work_dir, shard, len(done) + start + len(lines), len(wanted))
    marker = {"n": len(wanted), "scored_this_run": len(todo), "errors_this_run": n_errors}
    (shard_dir / COMPLETE_FILE).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return {"shard": str(shard), "n": len(wanted), "scored": len(todo), "skipped": False}


def _run_batch(detector: ImageDetector, records: Sequence[EvalRecord], batch: list[int], job: JobSpec) -> list[dict]:
    lines: dict[int, dict] = {}
    images, questions, kept = [], [], []
    for i in batch:
        image, error = _load(records[i], job)
        if error is not None:
            lines[i] = output_line(i, records[i], job.setting, None, error)
            continue
        images.append(image)
        questions.append(records[i].question)
        kept.append(i)
    if kept:
        for i, result in zip(kept, _score(detector, images, questions)):
            if isinstance(result, str):
                lines[i] = output_line(i, records[i], job.setting, None, result)
            else:
                lines[i] = output_line(i, records[i], job.setting, result, None)
    return [lines[i] for i in batch]


# --------------------------------------------------------------------------------------------------
# Gathering


def incomplete_shards(work_dir: str | Path, num_shards: int) -> list[int]:
    work_dir = Path(work_dir)
    return [i for i in range(num_shards) if not (work_dir / shard_dirname(i, num_shards) / COMPLETE_FILE).is_file()]


def gather(records: Sequence[EvalRecord], work_dir: str | Path, num_shards: int,
           fingerprint: dict[str, Any] | None = None) -> list[dict]:
    """Every shard's output lines, in record order; IncompleteJobError while a shard is unfinished.

    Every shard must carry ``fingerprint`` (when given) or, without it, the same fingerprint as shard 0 with
    the digest of ``records`` (so a gather-only run needs the benchmark, not the model)."""
    work_dir = Path(work_dir)
    missing = incomplete_shards(work_dir, num_shards)
    if missing:
        listed = ", ".join(f"{i}/{num_shards}" for i in missing)
        raise IncompleteJobError(f"{work_dir}: shard(s) {listed} not complete; run them (--shard I/N) "
                                 "before gathering")
    if fingerprint is None:
        fingerprint = stored_fingerprint(work_dir, num_shards)
        if fingerprint.get("records") != records_digest(records):
            raise JobMismatchError(f"{work_dir} was scored on a different record list than the benchmark given "
                                   "(files added, removed or relabelled?)")
    by_index: dict[int, dict] = {}
    for i in range(num_shards):
        shard_dir = work_dir / shard_dirname(i, num_shards)
        _check_fingerprint(shard_dir, fingerprint)
        wanted = set(shard_indices(len(records), ShardSpec(i, num_shards)))
        lines = read_outputs(shard_dir / OUTPUTS_FILE)
        _done_indices(lines, records, wanted, shard_dir / OUTPUTS_FILE)
        by_index.update((line["index"], line) for line in lines)
    absent = len(records) - len(by_index)
    if absent:
        raise IncompleteJobError(f"{work_dir}: {absent} record(s) have no output although every shard is "
                                 "marked complete; remove the work directory and re-run")
    return [_decoded(by_index[i]) for i in range(len(records))]


def stored_fingerprint(work_dir: str | Path, num_shards: int) -> dict[str, Any]:
    """The fingerprint shard 0 of ``num_shards`` was run with (HarnessError when there is none)."""
    path = Path(work_dir) / shard_dirname(0, num_shards) / FINGERPRINT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise HarnessError(f"no readable job fingerprint at {path} ({err})") from None


def _decoded(line: dict) -> dict:
    out = dict(line)
    out["p_fake"] = math.nan if line.get("p_fake") is None else float(line["p_fake"])
    return out


def run_job(detector: ImageDetector | None, records: Sequence[EvalRecord], job: JobSpec,
            shard: ShardSpec | None = None, overwrite: bool = False, gather_only: bool = False) -> list[dict] | None:
    """Run this process's shard, then gather when every shard is complete. Returns the outputs in record
    order, or None while other shards are still missing. ``gather_only`` scores nothing (``detector`` may
    be None) and gathers the ``shard.count`` shards already written."""
    shard = shard or ShardSpec()
    if gather_only:
        return gather(records, job.work_dir, shard.count)
    if detector is None:
        raise ValueError("a detector is needed unless gather_only")
    run_shard(detector, records, job, shard, overwrite=overwrite)
    missing = incomplete_shards(job.work_dir, shard.count)
    if missing:
        logger.info("%s: waiting for shard(s) %s of %d; the last one to finish writes the report",
                    job.work_dir, missing, shard.count)
        return None
    return gather(records, job.work_dir, shard.count, job.fingerprint(records, shard.count))


# --------------------------------------------------------------------------------------------------
# One benchmark run (used by every evaluation job)


@dataclass
class ScoredRun:
    """What :func:`score_benchmark` did: ``outputs`` (None while other shards are missing), where, and the
    fingerprint the outputs were produced with (for the report's provenance)."""

    outputs: list[dict] | None
    work_dir: Path
    shard: ShardSpec
    fingerprint: dict[str, Any] | None


def work_dir_for(out_dir: str | Path, name: str, setting: str) -> Path:
    return Path(out_dir) / f"{name}.work" / parse_setting(setting).name


def score_benchmark(detector: ImageDetector | None, records: Sequence[EvalRecord], out_dir: str | Path, name: str,
                    identity: dict[str, Any] | None, setting: str = "none", perturb_seed: int = 0, batch_size: int = 8,
                    shard: str | ShardSpec | None = None, overwrite: bool = False,
                    gather_only: bool = False) -> ScoredRun:
    """Score ``records`` under ``setting`` in ``<out_dir>/<name>.work/<setting>/`` (this process's shard, see
    :func:`resolve_shard`) and gather when all shards are complete."""
    spec = resolve_shard(shard)
    job = JobSpec(work_dir_for(out_dir, name, setting), identity, setting, perturb_seed, batch_size)
    outputs = run_job(detector, records, job, spec, overwrite=overwrite, gather_only=gather_only)
    fingerprint = stored_fingerprint(job.work_dir, spec.count) if outputs is not None else None
    return ScoredRun(outputs, job.work_dir, spec, fingerprint)


def error_summary(outputs: Sequence[dict], invalid: Sequence[str] = ()) -> dict[str, Any]:
    """Records that could not be scored (``n_errors``: unreadable images, rejected by the detector) plus invalid
    benchmark entries (``n_invalid_entries``) = ``n_skipped``, by reason, with a few examples."""
    errors = [o["error"] for o in outputs if o.get("error") is not None]
    skipped = errors + list(invalid)
    reasons = Counter(e.split(":", 1)[0] for e in skipped)
    return {"n_skipped": len(skipped), "n_errors": len(errors), "n_invalid_entries": len(invalid),
            "by_reason": dict(sorted(reasons.items())), "examples": skipped[:10]}


def require_scorable(outputs: Sequence[dict], invalid: Sequence[str], what: str) -> None:
    """NoScorableImagesError unless at least one output was scored: a report of a benchmark nobody could
    score would print zeros that look like results."""
    if any(o.get("error") is None for o in outputs):
        return
    summary = error_summary(outputs, invalid)
    raise NoScorableImagesError(
        f"{what}: nothing to score: {summary['n_errors']} of {len(outputs)} images failed "
        f"({summary['by_reason']}), {summary['n_invalid_entries']} invalid entries, e.g. {summary['examples'][:3]}; "
        "no report written")
