"""Reproduction: re-run a submission's image as it ran, and compare case by case.

    recorded run (from the database, or from a bundle: engine/bundles.py)
      -> the dataset, intact and still the recorded version (else refused, with what to do)
      -> the image, present by digest (from the store, or the bundle's tar)
      -> each shard re-run with its recorded RunSpec, scored by the one evaluation path
      -> each case compared with its recorded result:
           identical         the same output bytes (sha256), the same validity
           within-tolerance  other bytes, every metric within the challenge's tolerance
           differs           a metric moved past its tolerance, or validity changed
      -> the verdict (the worst case's), the largest difference, the metrics that moved

On the platform (`reproduce_submission`) the re-run is recorded as a new
`ReproductionRow` linked to the submission, never in place of its results, and the effect
on the rank is the leaderboard recomputed with the reproduced values in place of the
recorded ones. The exit status of `epreuve reproduce` says the verdict (`EXIT_CODES`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import queue
from engine.challenges import Challenge, challenge_definition
from engine.datasets import (
    DatasetVersionChanged,
    SealedDataset,
    require_intact,
    require_version,
    stage,
    unstage,
)
from engine.errors import Conflict, NotFound, Unavailable
from engine.evaluation import SandboxLimits, ScoredCase, run_spec, score_outputs
from engine.image_presence import ensure_image
from engine.statuses import SubmissionStatus, Verdict
from engine.store import BlobStore
from runners.base import FailureReason, Runner, RunResult, RunSpec
from runners.image_user import numeric_pair

# `epreuve reproduce` exits with the verdict; 1, 2 and 3 stay the errors' (engine/errors.py)
EXIT_CODES = {Verdict.IDENTICAL: 0, Verdict.WITHIN_TOLERANCE: 4, Verdict.DIFFERS: 5}
# The RunSpec fields a re-run takes from the record: the sandbox, not the paths or labels
REPLAYED = ("output_quota_bytes", "tmp_size_bytes", "memory_bytes", "cpus", "pids_limit",
            "shm_size_bytes", "nofile", "timeout_seconds", "stop_grace_seconds", "user",
            "log_cap_bytes")
SEVERITY = [Verdict.IDENTICAL, Verdict.WITHIN_TOLERANCE, Verdict.DIFFERS]


class ReproductionRefused(Conflict):
    """The submission cannot be re-run as it was (not evaluated, dataset re-sealed)."""


# -- what was recorded ---------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One recorded container run: its cases in order and its sandbox (RunSpec fields)."""

    case_ids: list[str]
    spec: dict[str, Any]
    gpus: int = 0
    job_id: int | None = None  # on the platform


@dataclass(frozen=True)
class RecordedRun:
    """Everything a re-run needs, as plain data: read from the database or a bundle."""

    submission_id: int
    team: str
    challenge: Challenge
    phase: str
    image_id: str
    archive_sha256: str | None
    dataset_version: str
    shards: list[Shard]
    results: dict[str, dict[str, Any]]  # case -> valid, reason, metrics, output_sha256


def recorded_run(session: Session, submission_id: int) -> RecordedRun:
    """A finished submission as it ran: its jobs' shards, their RunSpecs, its results."""
    from engine.db.models import CaseResultRow, JobRow, SubmissionRow

    submission = session.get(SubmissionRow, submission_id)
    if submission is None:
        raise NotFound(f"no submission {submission_id}")
    if submission.status != SubmissionStatus.SUCCEEDED:
        raise ReproductionRefused(
            f"submission {submission_id} was not evaluated ({submission.status}): there are "
            "no results to reproduce")
    challenge = challenge_definition(submission.phase.challenge)
    limits = SandboxLimits.of(challenge.phase(submission.phase.slug).limits)
    image = submission.image
    user = image.user if numeric_pair(image.user or "") else None
    rows = list(session.scalars(select(CaseResultRow).where(
        CaseResultRow.submission_id == submission.id).order_by(CaseResultRow.id)))
    shards = []
    for job_id in sorted({row.job_id for row in rows}):
        job = session.get(JobRow, job_id)
        ran = {row.case_id for row in rows if row.job_id == job_id}
        cases = [c for c in job.case_ids if c in ran]
        shards.append(Shard(cases, recorded_spec(job.run_result, limits, len(cases), user),
                            job.gpus, job.id))
    return RecordedRun(
        submission_id=submission.id, team=submission.team.name, challenge=challenge,
        phase=submission.phase.slug, image_id=image.image_id,
        archive_sha256=image.archive_sha256, dataset_version=submission.dataset_version,
        shards=shards, results={row.case_id: recorded_case(row) for row in rows})


def recorded_case(row) -> dict[str, Any]:
    return {"valid": row.valid, "reason": row.reason, "metrics": dict(row.metrics),
            "output_sha256": dict(row.output_sha256)}


def recorded_spec(run_result: Mapping | None, limits: SandboxLimits, n_cases: int,
                  user: str | None) -> dict[str, Any]:
    """The RunSpec's sandbox fields as the job ran: from its provenance where it was
    recorded (engine/provenance.py), else rebuilt from the phase's limits the same way the
    worker built it (engine/evaluation.run_spec)."""
    recorded = ((run_result or {}).get("provenance") or {}).get("run_spec")
    if isinstance(recorded, Mapping):
        return {name: recorded[name] for name in REPLAYED if name in recorded}
    spec = run_spec(limits, "-", Path("-"), Path("-"), n_cases, user=user)
    return {name: getattr(spec, name) for name in REPLAYED}


# -- the re-run ----------------------------------------------------------------------------

def dataset_for(root: Path, run: RecordedRun) -> SealedDataset:
    """The dataset, intact and still the recorded version; else refused, saying what to do."""
    dataset = require_intact(root)
    try:
        require_version(dataset, run.dataset_version, f"submission {run.submission_id}")
    except DatasetVersionChanged:
        raise ReproductionRefused(
            f"submission {run.submission_id} ran on dataset version "
            f"{run.dataset_version[:12]}, but {root} is now version {dataset.version[:12]}: "
            "its inputs are not the ones it saw. Reproduce it on the version it ran on (the "
            "release of that version: epreuve reproduce BUNDLE --data DIR), or re-run it on "
            "the current version as a new submission (a re-run, then compare)") from None
    return dataset


def rerun(run: RecordedRun, dataset: SealedDataset, runner: Runner, image_id: str,
          work_dir: Path, *, gpu_uuids: tuple[str, ...] = ()
          ) -> tuple[dict[str, ScoredCase], list[dict]]:
    """Each recorded shard run again with its RunSpec and scored: (cases, run results)."""
    scored: dict[str, ScoredCase] = {}
    runs = []
    for index, shard in enumerate(run.shards):
        base = work_dir / f"shard-{index}"
        staged = stage(dataset, shard.case_ids, base / "input")
        try:
            spec = RunSpec(image=image_id, input_dir=staged, output_dir=base / "output",
                           gpu_uuids=gpu_uuids[:shard.gpus],
                           labels={"org.epreuve.reproduction": str(run.submission_id)},
                           **shard.spec)
            result = runner.run(spec)
        finally:
            unstage(staged)
        if result.reason is FailureReason.INFRASTRUCTURE:
            raise Unavailable(f"the re-run of {', '.join(shard.case_ids)} failed on this "
                              f"machine's side: {result.message}")
        runs.append({"case_ids": shard.case_ids, **_run_record(result)})
        for case in score_outputs(run.challenge, dataset, shard.case_ids, result,
                                  base / "output", runner=runner, work_dir=base):
            scored[case.case_id] = case
    return scored, runs


def _run_record(result: RunResult) -> dict:
    data = result.to_dict()
    return {key: data.get(key) for key in ("status", "reason", "message", "wall_seconds",
                                           "image_id", "user")}


def gpus_needed(run: RecordedRun) -> int:
    return max((shard.gpus for shard in run.shards), default=0)


def local_gpus(count: int) -> tuple[str, ...]:
    """`count` of this machine's GPUs, by UUID (a reproduction needs them as the run did)."""
    if count == 0:
        return ()
    from gpu.inventory import list_gpus

    found = tuple(g.uuid for g in list_gpus())
    if len(found) < count:
        raise Unavailable(f"the run used {count} GPU(s); this machine has {len(found)}")
    return found[:count]


# -- the comparison ------------------------------------------------------------------------

@dataclass
class CaseComparison:
    case_id: str
    verdict: Verdict
    moved: list[str] = field(default_factory=list)  # metrics past their tolerance
    largest: tuple[str, float] | None = None  # (metric, absolute difference)
    recorded: dict[str, Any] = field(default_factory=dict)
    reproduced: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        data["largest"] = None if self.largest is None else {
            "metric": self.largest[0], "difference": _json_number(self.largest[1])}
        return data


@dataclass
class Comparison:
    verdict: Verdict
    cases: list[CaseComparison]
    rank: dict[str, Any] | None = None  # the effect on the leaderboard (platform only)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def summary(self) -> dict[str, Any]:
        moved = sorted({m for c in self.cases for m in c.moved})
        largest = max((c.largest for c in self.cases if c.largest), key=lambda m: m[1],
                      default=None)
        return {
            "verdict": self.verdict.value,
            "cases": {v.value: [c.case_id for c in self.cases if c.verdict == v]
                      for v in SEVERITY},
            "metrics_moved": moved,
            "largest_difference": None if largest is None else {
                "metric": largest[0], "difference": _json_number(largest[1]),
                "case_id": next(c.case_id for c in self.cases if c.largest == largest)},
            "rank": self.rank,
        }


def compare(challenge: Challenge, recorded: Mapping[str, Mapping],
            reproduced: Mapping[str, ScoredCase]) -> Comparison:
    """Each recorded case against its re-run (a case missing from either side differs)."""
    cases = [compare_case(challenge, case_id, recorded.get(case_id), reproduced.get(case_id))
             for case_id in sorted(set(recorded) | set(reproduced))]
    worst = max((SEVERITY.index(c.verdict) for c in cases), default=0)
    return Comparison(SEVERITY[worst], cases)


def compare_case(challenge: Challenge, case_id: str, recorded: Mapping | None,
                 again: ScoredCase | None) -> CaseComparison:
    reproduced = {} if again is None else {"valid": again.valid, "reason": again.reason,
                                           "metrics": again.metrics,
                                           "output_sha256": again.output_sha256}
    if recorded is None or again is None:
        return CaseComparison(case_id, Verdict.DIFFERS, ["(case)"], None, dict(recorded or {}),
                              reproduced)
    before, after = numbers(recorded["metrics"]), numbers(again.metrics)
    differences = {key: _difference(before.get(key), after.get(key))
                   for key in sorted(set(before) | set(after))}
    moved = [key for key, d in differences.items() if d > challenge.metrics.tolerance(key)]
    largest = max(differences.items(), key=lambda kv: kv[1], default=None)
    same_validity = bool(recorded["valid"]) == again.valid and recorded["reason"] == again.reason
    if same_validity and dict(recorded["output_sha256"]) == again.output_sha256:
        verdict = Verdict.IDENTICAL
    elif same_validity and not moved:
        verdict = Verdict.WITHIN_TOLERANCE
    else:
        verdict = Verdict.DIFFERS
        if not same_validity:
            moved = ["(validity)", *moved]
    if largest is not None and largest[1] == 0:
        largest = None
    return CaseComparison(case_id, verdict, moved, largest, dict(recorded), reproduced)


def numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in a case's metrics, flat: `dice[1]`, `probabilities.a`."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _difference(before: float | None, after: float | None) -> float:
    if before is None or after is None:
        return math.inf
    if math.isnan(before) or math.isnan(after):
        return 0.0 if math.isnan(before) and math.isnan(after) else math.inf
    if before == after:  # also equal infinities
        return 0.0
    return abs(before - after)


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


# -- on the platform -----------------------------------------------------------------------

def reproduce_submission(session: Session, settings, submission_id: int, runner: Runner,
                         store: BlobStore, *, actor: str = "cli",
                         built_image: str | None = None) -> tuple[Comparison, int]:
    """Re-run a finished submission (its pinned image, or `built_image`), compare, record it
    as a reproduction of the submission. Flushes; the caller commits. (comparison, row id)"""
    from engine.db.models import ReproductionRow, SubmissionRow

    run = recorded_run(session, submission_id)
    submission = session.get(SubmissionRow, submission_id)
    dataset = dataset_for(Path(submission.phase.dataset_path), run)
    image_id = built_image or run.image_id
    if built_image is None:
        ensure_image(runner, store, run.image_id, run.archive_sha256)
    gpus = local_gpus(gpus_needed(run))
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reproduce-", dir=settings.work_dir))
    try:
        reproduced, runs = rerun(run, dataset, runner, image_id, work, gpu_uuids=gpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    comparison = compare(run.challenge, run.results, reproduced)
    if comparison.verdict != Verdict.IDENTICAL:
        comparison.rank = rank_effect(session, submission, reproduced)
    row = ReproductionRow(
        submission_id=submission_id, source="built" if built_image else "pinned",
        image_id=image_id, dataset_version=run.dataset_version,
        verdict=comparison.verdict.value, summary=comparison.summary(),
        cases=[c.to_dict() for c in comparison.cases], runs=runs, actor=actor)
    session.add(row)
    session.flush()
    queue.record(session, "submission", submission_id, submission.status, submission.status,
                 actor, f"reproduced ({row.source} image): {comparison.verdict.value}")
    return comparison, row.id


def rank_effect(session: Session, submission, reproduced: Mapping[str, ScoredCase]
                ) -> dict[str, Any] | None:
    """The submission's rank and scores with the reproduced values in place of its recorded
    ones (None when it is not on the leaderboard: an older submission of its team)."""
    from engine.leaderboard import leaderboard

    challenge_id, slug = submission.phase.challenge_id, submission.phase.slug
    before = {e.submission_id: e for e in leaderboard(session, challenge_id, slug)}
    if submission.id not in before:
        return None
    if challenge_definition(submission.phase.challenge).task == "classification":
        return {"rank_recorded": before[submission.id].rank, "rank_reproduced": None,
                "note": "classification is ranked on whole-set metrics: not recomputed"}
    substitute = {case_id: {"valid": c.valid, "metrics": c.metrics}
                  for case_id, c in reproduced.items()}
    after = {e.submission_id: e for e in leaderboard(
        session, challenge_id, slug, substitute={submission.id: substitute})}
    old, new = before[submission.id], after[submission.id]
    return {"rank_recorded": old.rank, "rank_reproduced": new.rank,
            "scores_recorded": old.scores, "scores_reproduced": new.scores,
            "teams": len(before)}


# -- the open-source prize check: an image built from the published source ----------------

def build_from_source(directory: Path, runner: Runner) -> str:
    """Build the image of `directory` (its Dockerfile) with no network: its image id."""
    import docker
    from docker.errors import APIError, BuildError, DockerException

    directory = Path(directory)
    if not (directory / "Dockerfile").is_file():
        raise NotFound(f"{directory} holds no Dockerfile: pass the folder of the published "
                       "source that builds the image")
    try:
        client = docker.DockerClient(base_url=getattr(runner, "base_url", None)
                                     or "unix:///var/run/docker.sock")
        image, _ = client.images.build(path=str(directory), network_mode="none", rm=True,
                                       labels={"org.epreuve.built-from-source": "1"})
    except BuildError as exc:
        raise ReproductionRefused(f"the source in {directory} did not build (with no "
                                  f"network): {exc.msg}") from None
    except (APIError, DockerException) as exc:
        raise Unavailable(f"the Docker Engine could not build {directory}: {exc}") from None
    return image.id


# -- the report ----------------------------------------------------------------------------

def report(comparison: Comparison, *, submission_id: int, team: str, image_id: str,
           reproduction_id: int | None = None) -> dict[str, Any]:
    """What `epreuve reproduce --json` prints."""
    return {"submission_id": submission_id, "team": team, "image_id": image_id,
            "reproduction_id": reproduction_id, "verdict": comparison.verdict.value,
            "exit_code": comparison.exit_code, "summary": comparison.summary(),
            "cases": [c.to_dict() for c in comparison.cases]}


def report_lines(data: Mapping[str, Any]) -> list[str]:
    """The same report as lines of text: a line per case, then the verdict."""
    lines = [f"submission {data['submission_id']} ({data['team']}), image "
             f"{data['image_id'][:19]}"]
    for case in data["cases"]:
        detail = ""
        if case["moved"]:
            detail = f"  moved: {', '.join(case['moved'])}"
        if case["largest"]:
            detail += (f"  largest difference: {case['largest']['metric']} "
                       f"{case['largest']['difference']}")
        lines.append(f"  {case['case_id']}: {case['verdict']}{detail}")
    summary = data["summary"]
    lines.append(f"verdict: {data['verdict']}")
    if summary["metrics_moved"]:
        lines.append(f"metrics that moved: {', '.join(summary['metrics_moved'])}")
    if summary["largest_difference"]:
        largest = summary["largest_difference"]
        lines.append(f"largest difference: {largest['metric']} {largest['difference']} "
                     f"(case {largest['case_id']})")
    rank = summary.get("rank")
    if rank and rank.get("rank_reproduced") is not None:
        lines.append(f"rank: {rank['rank_recorded']} as recorded, {rank['rank_reproduced']} "
                     f"with the reproduced values (of {rank['teams']} teams)")
    return lines
