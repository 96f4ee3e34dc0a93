"""The one evaluation path: a phase's sandbox as a RunSpec, then validate-then-score.

    phase limits -> RunSpec (the same for `check`, the smoke job and the main jobs)
    collected outputs -> parsed as untrusted bytes (engine/outputs.py), confined to their
    case folder -> scored against the ground truth (engine/scoring), or by the organisers'
    evaluation image (engine/evaluation_image.py)

Used by the coordinator that completes a job (the trusted side: the only reader of ground
truth), by `epreuve check`, and later by the server's scorer. No database here: what is
scored is returned as `ScoredCase`s, and the caller writes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.challenges import Challenge, Phase, metric_keys
from engine.datasets import (
    SealedDataset,
    VerificationCache,
    require_intact,
    require_version,
)
from engine.evaluation_image import run_evaluation_image
from engine.medio import read_header, read_volume
from engine.outputs import (
    ProbabilityOutput,
    SegmentationOutput,
    untrusted_case,
    untrusted_table,
    validate_probabilities,
    validate_segmentation,
)
from engine.scoring.cases import CasePair, LesionSettings, score_cases
from engine.scoring.conventions import image_diagonal_mm, worst_value
from engine.scoring.evaluation_image import EvaluationImageUnusable, pinned_evaluation_image
from engine.scoring.segmentation import SegmentationSettings
from runners.base import FailureReason, Runner, RunResult, RunSpec

RUN_FAILURES = frozenset({FailureReason.TIMEOUT, FailureReason.OOM_KILLED,
                          FailureReason.NONZERO_EXIT, FailureReason.OUTPUT_QUOTA,
                          FailureReason.OUTPUT_INVALID, FailureReason.IMAGE_INVALID,
                          FailureReason.CANCELLED})
# A run that ended like this may still have written some cases whole: those are scored.
PARTIAL_RUN_FAILURES = frozenset({FailureReason.TIMEOUT, FailureReason.OOM_KILLED,
                                  FailureReason.NONZERO_EXIT, FailureReason.OUTPUT_QUOTA})

class EvaluatorFailed(RuntimeError):
    """The organisers' evaluation image failed: not the participant's fault (retried)."""


@dataclass(frozen=True)
class SandboxLimits:
    """A phase's limits as plain data: what a node needs to build the RunSpec of a job."""

    time_per_case: float
    memory: int
    cpus: float
    pids: int
    shm: int
    tmp: int
    output_quota: int

    @classmethod
    def of(cls, limits) -> SandboxLimits:
        """From a challenge phase's `limits`."""
        return cls(time_per_case=limits.time_per_case, memory=limits.memory, cpus=limits.cpus,
                   pids=limits.pids, shm=limits.shm, tmp=limits.tmp,
                   output_quota=limits.output_quota)


def run_spec(limits: SandboxLimits, image_id: str, input_dir: Path, output_dir: Path,
             n_cases: int, gpu_uuids: tuple[str, ...] = (),
             labels: dict[str, str] | None = None, user: str | None = None) -> RunSpec:
    """The one sandbox of a phase: the workers and a participant's `check` both use it."""
    return RunSpec(
        image=image_id, input_dir=input_dir, output_dir=output_dir,
        timeout_seconds=limits.time_per_case * n_cases,
        memory_bytes=limits.memory, cpus=limits.cpus, pids_limit=limits.pids,
        shm_size_bytes=limits.shm, tmp_size_bytes=limits.tmp,
        output_quota_bytes=limits.output_quota, gpu_uuids=gpu_uuids, labels=labels or {},
        user=user,  # the uid:gid resolved at intake: a name cannot resolve differently now
    )


def phase_run_spec(phase: Phase, image_id: str, input_dir: Path, output_dir: Path,
                   n_cases: int, gpu_uuids: tuple[str, ...] = (),
                   labels: dict[str, str] | None = None, user: str | None = None) -> RunSpec:
    return run_spec(SandboxLimits.of(phase.limits), image_id, input_dir, output_dir, n_cases,
                    gpu_uuids, labels, user)


def verified_dataset(path: str | Path, version: str,
                     cache: VerificationCache | None = None, *,
                     what: str = "this work") -> SealedDataset:
    """A dataset, intact and still the version the work was queued for: a re-seal since is
    refused (DatasetVersionChanged), never run or scored against silently."""
    dataset = require_intact(Path(path), cache=cache)
    require_version(dataset, version, what)
    return dataset


@dataclass
class ScoredCase:
    case_id: str
    valid: bool
    reason: str | None
    message: str
    metrics: dict
    output_sha256: dict


def run_failed(result: RunResult) -> bool:
    """The run itself failed in a way that is the participant's (or was cancelled)."""
    return result.reason in RUN_FAILURES


def score_outputs(challenge: Challenge, dataset: SealedDataset, case_ids: list[str],
                  result: RunResult, output_dir: Path, *, runner: Runner | None = None,
                  work_dir: Path | None = None, workers: int | None = None
                  ) -> list[ScoredCase]:
    """Every case of a run, validated then scored, in `case_ids` order. A failed run's
    cases that were written whole are scored; the others get its reason. `runner` runs the
    organisers' evaluation image where the challenge has one (EvaluatorFailed otherwise)."""
    failed = run_failed(result)
    if failed and result.reason not in PARTIAL_RUN_FAILURES:
        return [ScoredCase(c, False, result.reason.value, result.message,
                           _worst(challenge, dataset, c), {}) for c in case_ids]
    fallback = (result.reason.value, result.message) if failed else None
    if isinstance(challenge.output, ProbabilityOutput):
        cases = _score_probabilities(challenge.output, case_ids, output_dir)
        return [c if c.valid or fallback is None else
                ScoredCase(c.case_id, False, *fallback, c.metrics, c.output_sha256)
                for c in cases]
    return _score_segmentation(challenge, dataset, result, output_dir, case_ids, fallback,
                               runner=runner, work_dir=work_dir, workers=workers)


def _worst(challenge: Challenge, dataset: SealedDataset, case_id: str) -> dict:
    if challenge.task == "classification":
        return {}
    return worst_metrics(challenge, dataset, case_id)


def _score_segmentation(challenge: Challenge, dataset: SealedDataset, result: RunResult,
                        output_dir: Path, case_ids: list[str],
                        fallback: tuple[str, str] | None, *, runner: Runner | None,
                        work_dir: Path | None, workers: int | None) -> list[ScoredCase]:
    spec: SegmentationOutput = challenge.output
    skipped = frozenset(result.skipped_outputs)
    scored, pairs = {}, []
    for case_id in case_ids:
        reference = dataset.ground_truth_path(case_id)
        geometry = read_header(reference).geometry  # ground truth: ours, errors are ours
        outcome = untrusted_case(case_id, validate_segmentation, output_dir, case_id,
                                 spec, geometry, skipped=skipped)
        if not outcome.valid:
            reason, message = fallback or (outcome.reason.value, outcome.message)
            scored[case_id] = ScoredCase(case_id, False, reason, message,
                                         _worst(challenge, dataset, case_id), {})
            continue
        prediction = output_dir / case_id / spec.filename
        pairs.append(CasePair(case_id, prediction, reference))
        scored[case_id] = ScoredCase(case_id, True, None, "valid", {},
                                     {spec.filename: sha256_of(prediction)})
    if pairs and challenge.metrics.evaluation_image:
        _score_with_evaluator(challenge, dataset, output_dir, scored,
                              [p.case_id for p in pairs], runner=runner, work_dir=work_dir)
    elif pairs:
        settings = SegmentationSettings(
            labels=tuple(challenge.metrics.labels),
            nsd_tolerance_mm=challenge.metrics.nsd_tolerance_mm,
            surface=challenge.metrics.surface, empty=challenge.metrics.empty_policy())
        lesions = LesionSettings(enabled=challenge.metrics.lesion_wise)
        for case_id, scores in score_cases(pairs, settings, lesions, workers=workers).items():
            scored[case_id].metrics = flatten(scores)
    return [scored[c] for c in case_ids]


def _score_with_evaluator(challenge: Challenge, dataset: SealedDataset, output_dir: Path,
                          scored: dict[str, ScoredCase], case_ids: list[str], *,
                          runner: Runner | None, work_dir: Path | None) -> None:
    """The organiser's image scores the valid outputs; its failures are the platform's."""
    try:
        image_id = pinned_evaluation_image(challenge.metrics.evaluation_image_id,
                                           challenge.metrics.evaluation_image)
    except EvaluationImageUnusable as exc:
        raise EvaluatorFailed(str(exc)) from None
    if runner is None:
        raise EvaluatorFailed("no runner was given for the organisers' evaluation image")
    outcome = run_evaluation_image(runner, image_id, output_dir, dataset, case_ids,
                                   work_dir=work_dir)
    if not outcome.succeeded:
        raise EvaluatorFailed(f"the organisers' evaluation image failed: {outcome.message}")
    wanted = [m.name for m in challenge.metrics.evaluator_metrics]
    for case_id in case_ids:
        metrics = outcome.metrics.cases.get(case_id, {})
        missing = [name for name in wanted if name not in metrics]
        if missing:
            scored[case_id] = ScoredCase(
                case_id, False, FailureReason.OUTPUT_INVALID.value,
                f"case {case_id}: the evaluation image reported no {', '.join(missing)}",
                _worst(challenge, dataset, case_id), scored[case_id].output_sha256)
        else:
            scored[case_id].metrics = {name: metrics[name] for name in wanted}


def _score_probabilities(spec: ProbabilityOutput, case_ids: list[str],
                         output_dir: Path) -> list[ScoredCase]:
    outcomes = untrusted_table(case_ids, validate_probabilities, output_dir, case_ids, spec)
    table = output_dir / spec.filename
    digest = {spec.filename: sha256_of(table)} if table.is_file() else {}
    return [ScoredCase(c, o.valid, None if o.valid else o.reason.value, o.message,
                       {"probabilities": o.probabilities} if o.valid else {}, digest)
            for c, o in outcomes.items()]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def flatten(scores: dict[int, dict[str, float]]) -> dict[str, float]:
    return {f"{metric}[{label}]": value for label, values in scores.items()
            for metric, value in values.items()}


def worst_metrics(challenge: Challenge, dataset: SealedDataset, case_id: str) -> dict[str, float]:
    """Every metric of a case at its worst, from the reference's geometry and volumes."""
    if challenge.metrics.evaluation_image:
        return {m.name: m.worst for m in challenge.metrics.evaluator_metrics}
    truth = dataset.case(case_id)["ground_truth"]
    diagonal = image_diagonal_mm(tuple(truth["shape"]), tuple(truth["spacing"]))
    voxel_ml = float(np.prod(truth["spacing"])) / 1000.0
    volumes = _label_volumes(str(dataset.ground_truth_path(case_id)), dataset.version)
    worst = {}
    for key in metric_keys(challenge):
        metric, label = key[:-1].split("[")
        volume_ml = volumes.get(int(label), 0) * voxel_ml
        worst[key] = worst_value(metric, diagonal_mm=diagonal, reference_volume_ml=volume_ml)
    return worst


@lru_cache(maxsize=4096)
def _label_volumes(path: str, dataset_version: str) -> dict[int, int]:
    """Voxels per label of a sealed reference: read once, however many metrics need it
    (the dataset version in the key: a new seal is a new entry)."""
    labels, counts = np.unique(np.asarray(read_volume(Path(path)).array), return_counts=True)
    return {int(label): int(count) for label, count in zip(labels, counts, strict=True)}
