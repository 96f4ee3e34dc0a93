"""From a challenge file and a pinned image to jobs in the queue, and back to a result.

Rules a submission meets before any GPU time is spent:
- the phase is open (between `opens` and `closes`);
- the team is within its quota for the phase's period (submissions that failed
  for INFRASTRUCTURE reasons do not count);
- where the prize requires open code, a source URL and an SPDX license are
  given, or the submission is flagged as not prize-eligible (it is still run).

It then gets one smoke job over one case (`smoke_case`: the phase's first sample case,
the one `epreuve check` runs first); the remaining cases are queued,
in shards of `cases_per_run`, only once the smoke job succeeded: a broken image
costs one case of compute, not the test set.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine import queue
from engine.challenges import (
    HIDDEN_CHARACTERS,
    Challenge,
    ChallengeError,
    Locator,
    Phase,
    challenge_definition,
    load_challenge_file,
)
from engine.dataset_versions import record_dataset_version
from engine.datasets import DatasetError, SealedDataset, load
from engine.db.models import (
    ChallengeRow,
    ImageRow,
    PhaseRow,
    SubmissionRow,
    TeamRow,
    utcnow,
)
from engine.errors import Conflict
from engine.frozen import refuse_if_frozen
from engine.images import PinnedImage
from engine.statuses import JobKind, SubmissionStatus

# OSI-approved licenses most used for research code (SPDX identifiers)
OPEN_SOURCE_LICENSES = {
    "Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "GPL-2.0-only", "GPL-2.0-or-later",
    "GPL-3.0-only", "GPL-3.0-or-later", "LGPL-2.1-only", "LGPL-2.1-or-later",
    "LGPL-3.0-only", "LGPL-3.0-or-later", "AGPL-3.0-only", "AGPL-3.0-or-later", "MPL-2.0",
    "EPL-2.0", "ISC", "Unlicense", "CECILL-2.1", "EUPL-1.2", "BSL-1.0", "0BSD", "Zlib",
}
SOURCE_URL = re.compile(r"^https?://[^\s/$.?#].[^\s]*$")


class SubmissionRefused(Conflict, ValueError):
    """Not accepted (closed phase, quota, unknown challenge); the message says why."""


class ChallengeChanged(SubmissionRefused):
    """Re-registering would change a challenge that already has submissions."""


def register_challenge(session: Session, path: Path, actor: str = "cli", *,
                       force: bool = False) -> ChallengeRow:
    """Create (or update) a challenge from its file. Flushes; the caller commits."""
    challenge, locator = load_challenge_file(path)
    return register_loaded(session, challenge, locator, actor, force=force)


def register_loaded(session: Session, challenge: Challenge, locator: Locator,
                    actor: str = "cli", *, force: bool = False) -> ChallengeRow:
    """Create (or update) a parsed challenge. The whole definition is checked first (every
    field, every phase's sealed dataset and sample cases); only then is anything written.
    A change to a challenge whose phases have submissions needs `force`, and is recorded.
    Flushes; the caller commits."""
    challenge = _with_pinned_evaluation_image(challenge, locator)
    datasets = {phase.id: _phase_dataset(phase, index, locator)
                for index, phase in enumerate(challenge.phases)}
    definition = json.loads(challenge.model_dump_json())
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    row = session.get(ChallengeRow, challenge.id)
    changes: list[str] = []
    if row is None:
        row = ChallengeRow(id=challenge.id, title=challenge.title, task=challenge.task,
                           definition=definition, definition_sha256=digest)
        session.add(row)
    else:
        changes = _confirm_changes(session, row, challenge, datasets, force)
        row.title, row.task, row.definition, row.definition_sha256 = (
            challenge.title, challenge.task, definition, digest)
    for phase in challenge.phases:
        _register_phase(session, row, phase, datasets[phase.id])
    session.flush()
    if changes:
        for phase_row in row.phases:
            queue.record(session, "phase", phase_row.id, "registered", "redefined", actor,
                         "; ".join(changes))
    return row


def _with_pinned_evaluation_image(challenge: Challenge, locator: Locator) -> Challenge:
    """The organisers' evaluation image is pinned to its id now: the workers run that id,
    never the tag (a value typed into the file is replaced)."""
    from engine.images import pin_evaluation_image
    from engine.scoring.evaluation_image import EvaluationImageUnusable

    image_id = None
    if challenge.metrics.evaluation_image:
        try:
            image_id = pin_evaluation_image(challenge.metrics.evaluation_image)
        except EvaluationImageUnusable as exc:
            raise ChallengeError(locator.describe(("metrics", "evaluation_image"),
                                                  str(exc))) from None
    metrics = challenge.metrics.model_copy(update={"evaluation_image_id": image_id})
    return challenge.model_copy(update={"metrics": metrics})


def _phase_dataset(phase: Phase, index: int, locator: Locator) -> SealedDataset:
    def refuse(field: str, message: str) -> ChallengeError:
        return ChallengeError(locator.describe(("phases", index, *field.split(".")),
                                               f"phase {phase.id}: {message}"))

    try:
        dataset = load(phase.dataset.path)
    except DatasetError as exc:
        raise refuse("dataset.path", str(exc)) from None
    except (OSError, ValueError) as exc:  # an unreadable or garbled manifest
        raise refuse("dataset.path", f"the manifest of {phase.dataset.path} cannot be "
                                     f"read ({exc.__class__.__name__}): seal it again") from None
    if phase.dataset.version and phase.dataset.version != dataset.version:
        raise refuse("dataset.version", f"the dataset at {phase.dataset.path} is version "
                                        f"{dataset.version[:12]}, the challenge expects "
                                        f"{phase.dataset.version[:12]}")
    unknown = sorted(set(phase.sample_cases) - set(dataset.case_ids))
    if unknown:
        raise refuse("sample_cases", f"sample cases {unknown} are not in the dataset")
    return dataset


def _confirm_changes(session: Session, row: ChallengeRow, new: Challenge,
                     datasets: dict[str, SealedDataset], force: bool) -> list[str]:
    """What re-registering changes; refused without `force` once a phase has submissions,
    and always when it would remove a phase that has them."""
    old = challenge_definition(row)
    versions = {p.slug: p.dataset_version for p in row.phases}
    changes = definition_changes(old, new, versions,
                                 {slug: d.version for slug, d in datasets.items()})
    if not changes:
        return []
    used = dict(session.execute(select(PhaseRow.slug, func.count(SubmissionRow.id)).join(
        SubmissionRow, SubmissionRow.phase_id == PhaseRow.id).where(
        PhaseRow.challenge_id == row.id).group_by(PhaseRow.slug)).all())
    removed = sorted(slug for slug in used if slug not in {p.id for p in new.phases})
    if removed:
        raise ChallengeChanged(f"challenge {row.id}: phase(s) {', '.join(removed)} have "
                               "submissions and cannot be removed (close them instead: "
                               "phases[].closes)")
    if used and not force:
        listing = "\n".join(f"  - {change}" for change in changes)
        counts = ", ".join(f"{slug}: {count}" for slug, count in sorted(used.items()))
        raise ChallengeChanged(f"challenge {row.id} already has submissions ({counts}); this "
                               f"file would change:\n{listing}\nrun again with --force to "
                               "apply it (the change is recorded in each phase's history)")
    return changes


def definition_changes(old: Challenge, new: Challenge, old_versions: dict[str, str],
                       new_versions: dict[str, str]) -> list[str]:
    """Every difference between two definitions, one line each, phases matched by id."""
    before, after = json.loads(old.model_dump_json()), json.loads(new.model_dump_json())
    old_phases = {p["id"]: p for p in before.pop("phases")}
    new_phases = {p["id"]: p for p in after.pop("phases")}
    changes = [f"phase {slug} added" for slug in new_phases if slug not in old_phases]
    changes += [f"phase {slug} removed" for slug in old_phases if slug not in new_phases]
    changes += _differences(before, after, "")
    for slug in (s for s in new_phases if s in old_phases):
        changes += _differences(old_phases[slug], new_phases[slug], f"phase {slug}: ")
        if old_versions.get(slug) != new_versions.get(slug):
            changes.append(f"phase {slug}: dataset version {str(old_versions.get(slug))[:12]}"
                           f" -> {str(new_versions.get(slug))[:12]}")
    return changes


def _differences(before: dict, after: dict, prefix: str) -> list[str]:
    found = []
    for key in dict.fromkeys([*before, *after]):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return found


def _register_phase(session: Session, challenge: ChallengeRow, phase: Phase,
                    dataset: SealedDataset) -> None:
    row = session.scalar(select(PhaseRow).where(PhaseRow.challenge_id == challenge.id,
                                                PhaseRow.slug == phase.id))
    if row is None:
        row = PhaseRow(challenge=challenge, slug=phase.id)
        session.add(row)
    row.dataset_path, row.dataset_version = str(phase.dataset.path), dataset.version
    row.case_ids = dataset.case_ids
    record_dataset_version(session, dataset)


def smoke_case(phase: Phase, case_ids: list[str]) -> str:
    """The one case a submission runs first: the phase's first public sample case (the one
    `epreuve check` runs first, so a passing check means a passing smoke job), else the
    dataset's first case."""
    for case_id in phase.sample_cases:
        if case_id in case_ids:
            return case_id
    return case_ids[0]


def find_phase(session: Session, challenge_id: str, phase_slug: str) -> tuple[PhaseRow, Phase]:
    row = session.get(ChallengeRow, challenge_id)
    if row is None:
        raise SubmissionRefused(f"no challenge {challenge_id!r}: create it first "
                                "(epreuve challenge create FILE)")
    phase = challenge_definition(row).phase(phase_slug)
    phase_row = session.scalar(select(PhaseRow).where(PhaseRow.challenge_id == challenge_id,
                                                      PhaseRow.slug == phase_slug))
    return phase_row, phase


MAX_TEAM_NAME = 100


def team_name_problem(name: str) -> str | None:
    """Why `name` cannot be a new team's name, or None. One spelling per name: NFC, no
    surrounding spaces, so that 'é' typed two ways is one team, not two quotas."""
    if not name.strip():
        return "a team name cannot be empty"
    if len(name) > MAX_TEAM_NAME:
        return f"a team name has at most {MAX_TEAM_NAME} characters"
    # printed in every leaderboard and status line; invisible marks would let two names
    # look the same
    if HIDDEN_CHARACTERS.search(name):
        return f"team name {name[:60]!r} holds a control or invisible character"
    if name != name.strip() or name != unicodedata.normalize("NFC", name):
        return (f"team name {name[:60]!r} has surrounding spaces or is not in Unicode NFC "
                f"form; write {unicodedata.normalize('NFC', name.strip())[:60]!r}")
    return None


def get_or_create_team(session: Session, name: str) -> TeamRow:
    team = session.scalar(select(TeamRow).where(TeamRow.name == name))
    if team is None:
        problem = team_name_problem(name)
        if problem:
            raise SubmissionRefused(problem)
        team = TeamRow(name=name)
        session.add(team)
        session.flush()
    return team


def get_or_create_image(session: Session, pinned: PinnedImage) -> ImageRow:
    """The same image submitted again is the same row: recognised by its image id. A row
    from before the image store gets the archive now kept."""
    image = session.scalar(select(ImageRow).where(ImageRow.image_id == pinned.image_id))
    if image is None:
        image = ImageRow(image_id=pinned.image_id, tar_sha256=pinned.tar_sha256,
                         archive_sha256=pinned.archive_sha256,
                         layers=pinned.layers, reference=pinned.reference,
                         architecture=pinned.architecture, user=pinned.user,
                         size_bytes=pinned.size_bytes)
        session.add(image)
    elif image.archive_sha256 is None:
        image.archive_sha256 = pinned.archive_sha256
    session.flush()
    return image


def check_quota(session: Session, phase_row: PhaseRow, phase: Phase, team: TeamRow,
                now: datetime) -> None:
    window_start = now - phase.quota_period
    used = session.scalars(select(SubmissionRow.created_at).where(
        SubmissionRow.phase_id == phase_row.id, SubmissionRow.team_id == team.id,
        SubmissionRow.counts_against_quota.is_(True),
        SubmissionRow.created_at >= window_start).order_by(SubmissionRow.created_at)).all()
    if len(used) >= phase.quota.submissions:
        next_slot = used[0] + phase.quota_period
        raise SubmissionRefused(
            f"team {team.name} has used its quota of {phase.quota.submissions} submission(s) "
            f"per {_period(phase.quota_period)} in phase {phase.id}; the next one is possible "
            f"from {next_slot:%Y-%m-%d %H:%M} UTC (failures caused by the platform do not "
            "count)")


def _period(period: timedelta) -> str:
    seconds = period.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''}"
    return f"{seconds:g} s"


def prize_eligibility(phase: Phase, source_url: str | None,
                      license_id: str | None) -> tuple[bool, str | None]:
    if not phase.prize.requires_open_source:
        return True, None
    problems = []
    if not source_url or not SOURCE_URL.match(source_url):
        problems.append("a public source URL (https://...)")
    if license_id not in OPEN_SOURCE_LICENSES:
        problems.append("an open-source SPDX license (e.g. Apache-2.0, MIT, GPL-3.0-or-later)"
                        + (f"; {license_id!r} is not one" if license_id else ""))
    if problems:
        return False, ("not eligible for the prize: this phase requires " + " and ".join(
            problems) + ". The submission is evaluated all the same.")
    return True, None


def submit(session: Session, challenge_id: str, phase_slug: str, team_name: str,
           pinned: PinnedImage, *, source_url: str | None = None, license_id: str | None = None,
           actor: str = "cli", now: datetime | None = None,
           before_commit: Callable[[SubmissionRow], None] | None = None) -> SubmissionRow:
    """`before_commit` runs in the submission's own transaction (an API intake links itself
    to the new submission there, so that the two are written together or not at all)."""
    now = now or utcnow()
    phase_row, phase = find_phase(session, challenge_id, phase_slug)
    refuse_if_frozen(phase_row, "submit")
    if not phase.is_open(now):
        when = (f"opens {phase.opens:%Y-%m-%d %H:%M} UTC" if phase.opens and now < phase.opens
                else f"closed {phase.closes:%Y-%m-%d %H:%M} UTC")
        raise SubmissionRefused(f"phase {phase.id} of {challenge_id} is not open: it {when}")
    team = get_or_create_team(session, team_name)
    check_quota(session, phase_row, phase, team, now)
    eligible, note = prize_eligibility(phase, source_url, license_id)
    submission = SubmissionRow(phase=phase_row, team=team, image=get_or_create_image(
        session, pinned), source_url=source_url, license=license_id, prize_eligible=eligible,
        prize_note=note, created_at=now, dataset_version=phase_row.dataset_version,
        case_ids=list(phase_row.case_ids))  # its case set is fixed now: a re-seal moves no result
    session.add(submission)
    session.flush()
    queue.record(session, "submission", submission.id, None, SubmissionStatus.QUEUED, actor,
                 f"team {team.name}, image {pinned.image_id[:19]}")
    queue.enqueue(session, submission, [[smoke_case(phase, phase_row.case_ids)]],
                  kind=JobKind.SMOKE, actor=actor, gpus=phase.limits.gpus)
    if before_commit is not None:
        before_commit(submission)
    session.flush()
    return submission
