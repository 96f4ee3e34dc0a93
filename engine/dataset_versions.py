"""Which sealed dataset version a result was computed on, and what each version held.

A phase points at its dataset's current version; re-sealing the dataset and re-creating
the challenge (`challenge create --force`) moves it. Nothing computed before moves with it:

- a submission keeps the version and the case ids it was submitted on (its case set),
  and its aggregates and leaderboard values use that case set, never the phase's;
- a job keeps the version it was queued for, and the worker refuses to stage another
  version's inputs for it (`datasets.require_version`): it ends as INFRASTRUCTURE (retried,
  in case the old seal is restored; never counted against the team), so its submission
  ends as the platform's failure and needs a re-run;
- every version a phase pointed at is recorded here with a digest of each case's input
  files, so that `epreuve rescore` (engine/rescore.py) can tell which cases a container
  would see unchanged under the current version (scored again from stored outputs) and
  which it would not (changed or new inputs: a re-run).

A leaderboard entry computed on an older version than the phase's current one is stale.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from engine.datasets import (  # noqa: F401 (re-exported)
    DatasetError,
    DatasetVersionChanged,
    SealedDataset,
    case_input_digests,
    require_version,
)
from engine.db.models import DatasetVersionRow, SubmissionRow


def record_dataset_version(session: Session, dataset: SealedDataset) -> None:
    """Keep what this version held (once: a version is the sha256 of its manifest)."""
    if session.get(DatasetVersionRow, dataset.version) is None:
        session.add(DatasetVersionRow(version=dataset.version,
                                      case_inputs=case_input_digests(dataset.manifest)))


def case_inputs(session: Session, version: str) -> dict[str, str] | None:
    """{case_id: input digest} of a recorded version, or None when it was never recorded."""
    row = session.get(DatasetVersionRow, version)
    return None if row is None else dict(row.case_inputs)


def is_stale(submission: SubmissionRow) -> bool:
    """Its results were computed on an older version than its phase's current one."""
    return submission.dataset_version != submission.phase.dataset_version


def unchanged_cases(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """The cases of `new` whose inputs are byte for byte those of `old`, in `new`'s order."""
    old = old or {}
    return [case_id for case_id, digest in new.items() if old.get(case_id) == digest]



