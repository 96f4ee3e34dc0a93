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

from engine.config import Settings
from engine.datasets import stage, unstage
from engine.images import ImageInvalid, check_config, node_architecture
from engine.medio import read_header
from engine.outputs import (
    ProbabilityOutput,
    untrusted_case,
    untrusted_table,
    validate_probabilities,
    validate_segmentation,
)
from engine.results import flatten
from engine.scoring.cases import CasePair, LesionSettings, score_cases
from engine.scoring.segmentation import SegmentationSettings
from engine.submissions import (
    SubmissionRefused,
    challenge_definition,
    find_phase,
    smoke_case,
    verified_dataset,
)
from engine.worker import phase_run_spec
from runners import make_runner
from runners.base import ImageRejected


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
    dataset = verified_dataset(phase_row)
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
        cases = _validate_and_score(challenge, dataset, batch, output,
                                    frozenset(result.skipped_outputs))
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


def _validate_and_score(challenge, dataset, case_ids, output, skipped) -> dict[str, dict]:
    if isinstance(challenge.output, ProbabilityOutput):
        outcomes = untrusted_table(case_ids, validate_probabilities, output, case_ids,
                                   challenge.output)
        return {c: {"valid": o.valid, "reason": o.reason and o.reason.value,
                    "message": o.message, "metrics": o.probabilities or {}}
                for c, o in outcomes.items()}
    cases, pairs = {}, []
    for case_id in case_ids:
        reference = dataset.ground_truth_path(case_id)
        outcome = untrusted_case(case_id, validate_segmentation, output, case_id,
                                 challenge.output, read_header(reference).geometry,
                                 skipped=skipped)
        cases[case_id] = {"valid": outcome.valid, "reason": outcome.reason and
                          outcome.reason.value, "message": outcome.message, "metrics": {}}
        if outcome.valid:
            pairs.append(CasePair(case_id, output / case_id / challenge.output.filename,
                                  reference))
    settings = SegmentationSettings(labels=tuple(challenge.metrics.labels),
                                    nsd_tolerance_mm=challenge.metrics.nsd_tolerance_mm,
                                    surface=challenge.metrics.surface,
                                    empty=challenge.metrics.empty_policy())
    for case_id, scores in score_cases(pairs, settings, LesionSettings(
            enabled=challenge.metrics.lesion_wise), workers=1).items():
        cases[case_id]["metrics"] = flatten(scores)
    return cases
