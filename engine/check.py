"""`epreuve check`: a participant's dry run, exactly as the platform would run it.

The phase's public sample cases are staged like a real job's: first the smoke
case alone, exactly as a submission's smoke job runs it (`smoke_case`), then the
other sample cases together, so a passing check means a passing smoke job; the image runs
under the phase's sandbox and limits (the same `phase_run_spec` the workers
use), and the outputs are validated and scored the same way. Nothing is
written to the database and nothing counts against a quota.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from engine.challenges import challenge_definition
from engine.config import Settings
from engine.datasets import stage, unstage
from engine.evaluation import EvaluatorFailed, phase_run_spec, score_outputs, verified_dataset
from engine.images import ImageInvalid, check_config, node_architecture
from engine.outputs import ProbabilityOutput
from engine.submissions import SubmissionRefused, find_phase, smoke_case
from runners import make_runner
from runners.base import FailureReason, ImageRejected


def dry_run(session: Session, settings: Settings, image: str, challenge_id: str,
            phase_slug: str | None) -> dict[str, Any]:
    from engine.db.models import ChallengeRow

    row = session.get(ChallengeRow, challenge_id)
    if row is None:
        raise SubmissionRefused(f"no challenge {challenge_id!r}")
    challenge = challenge_definition(row)
    phase_slug = phase_slug or challenge.phases[0].id
    phase_row, phase = find_phase(session, challenge_id, phase_slug)
    if not phase.sample_cases:
        raise SubmissionRefused(f"phase {phase.id} publishes no sample cases to check against")
    runner = make_runner(settings.runner, state_dir=settings.state_dir / "runs")
    report: dict[str, Any] = {"image": image, "challenge": challenge_id, "phase": phase.id,
                              "cases": {}, "ok": False}
    try:
        attributes = runner.inspect_image(image)
        check_config({"architecture": attributes.get("Architecture"), "os": attributes.get("Os"),
                      "config": attributes.get("Config") or {}}, node_architecture())
    except (ImageInvalid, ImageRejected) as exc:
        report.update(reason="IMAGE_INVALID", message=str(exc))
        return report
    dataset = verified_dataset(phase_row.dataset_path, phase_row.dataset_version)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="epreuve-check-", dir=settings.work_dir))
    try:
        for index, batch in enumerate(check_batches(phase, phase_row.case_ids)):
            if not _run_batch(runner, phase, challenge, dataset, attributes["Id"], batch,
                              scratch / str(index), report, smoke=index == 0):
                return report
        report.update(ok=True, reason=None, message="every sample case produced a valid "
                      "output (the smoke case first, as a submission's smoke job runs it)")
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_batches(phase, case_ids: list[str]) -> list[list[str]]:
    """The smoke case alone, exactly as a submission's smoke job runs it, then the other
    sample cases together."""
    smoke = smoke_case(phase, case_ids)
    rest = [case_id for case_id in phase.sample_cases if case_id != smoke]
    return [[smoke]] + ([rest] if rest else [])


def _run_batch(runner, phase, challenge, dataset, image_id: str, batch: list[str],
               scratch: Path, report: dict[str, Any], *, smoke: bool) -> bool:
    staged = stage(dataset, batch, scratch / "input")
    output = scratch / "output"
    try:
        result = runner.run(phase_run_spec(phase, image_id, staged, output, len(batch)))
        report.setdefault("runs", []).append({"cases": batch, "smoke": smoke,
                                              **result.to_dict()})
        report["run"] = result.to_dict()
        if not result.succeeded:
            report.update(reason=result.reason.value, message=_stage_of(smoke, batch)
                          + result.message)
            return False
        try:
            cases = _validate_and_score(runner, challenge, dataset, batch, result, output,
                                        scratch)
        except EvaluatorFailed as exc:
            report.update(reason=FailureReason.INFRASTRUCTURE.value, message=str(exc))
            return False
        report["cases"].update(cases)
        invalid = [c for c, v in cases.items() if not v["valid"]]
        if invalid:
            report.update(reason=cases[invalid[0]]["reason"],
                          message=_stage_of(smoke, batch) + cases[invalid[0]]["message"])
            return False
        return True
    finally:
        unstage(staged)


def _stage_of(smoke: bool, batch: list[str]) -> str:
    if smoke:
        return (f"the smoke case {batch[0]} (a submission's first job) failed, so a submission "
                "would stop there: ")
    return "the smoke case passed; another sample case failed: "


def _validate_and_score(runner, challenge, dataset, case_ids, result, output,
                        scratch: Path) -> dict[str, dict]:
    """The workers' own path (engine/evaluation.py), shown as a participant reads it."""
    probabilities = isinstance(challenge.output, ProbabilityOutput)
    return {case.case_id: {"valid": case.valid, "reason": case.reason, "message": case.message,
                           "metrics": ({} if not case.valid else case.metrics.get(
                               "probabilities", {}) if probabilities else case.metrics)}
            for case in score_outputs(challenge, dataset, case_ids, result, output,
                                      runner=runner, work_dir=scratch, workers=1)}
