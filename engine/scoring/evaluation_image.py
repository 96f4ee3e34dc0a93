"""An organiser's own evaluation image, instead of the built-in metrics.

It runs in the same sandbox as a participant's container (no network,
read-only root, limits, never root), and sees:

    /input/cases.json                 the cases to score
    /input/predictions/<case_id>/...  the participant's collected outputs (read-only)
    /input/ground_truth/<case_id>/... the reference (read-only)

and must write `/output/metrics.json`:

    {"cases": {"<case_id>": {"<metric>": <finite number>, ...}, ...},
     "aggregates": {"<name>": <finite number>, ...}}        (aggregates optional)

The image is pinned by id when the challenge is created (`pin_evaluation_image`, in
engine/images.py: scoring runs no Docker client of its own), stored with the challenge,
and the workers run that id, never the tag: a tag moved later, by anyone, changes nothing.
An id absent from a node is the platform's failure (INFRASTRUCTURE), never the team's.

Anything else is refused with a typed reason: a missing file is OUTPUT_MISSING,
malformed JSON or a schema violation OUTPUT_INVALID, naming what is wrong. A
case the evaluator left out gets no metrics, so the engine gives it the worst
value like any failed case.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError, field_validator

from engine.datasets import SealedDataset, stage_tree, unstage
from engine.errors import EpreuveError
from runners.base import FailureReason, Runner, RunResult, RunSpec

MAX_METRICS_BYTES = 32 << 20
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


class EvaluationImageUnusable(EpreuveError, ValueError):
    """The evaluation image cannot be pinned or run; the message says why."""


def pinned_evaluation_image(image_id: str | None, reference: str) -> str:
    """The id a worker runs; a challenge created before pinning must be created again."""
    if not image_id or not IMAGE_ID.fullmatch(image_id):
        raise EvaluationImageUnusable(
            f"the evaluation image {reference!r} is not pinned to an image id: create the "
            "challenge again (epreuve challenge create FILE)")
    return image_id


class EvaluatorMetrics(BaseModel):
    cases: dict[str, dict[str, float]]
    aggregates: dict[str, float] = {}

    @field_validator("cases")
    @classmethod
    def _finite_cases(cls, cases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for case_id, metrics in cases.items():
            for name, value in metrics.items():
                if not math.isfinite(value):
                    raise ValueError(f"case {case_id}: {name} is {value}, not a finite number")
        return cases

    @field_validator("aggregates")
    @classmethod
    def _finite_aggregates(cls, aggregates: dict[str, float]) -> dict[str, float]:
        for name, value in aggregates.items():
            if not math.isfinite(value):
                raise ValueError(f"aggregate {name} is {value}, not a finite number")
        return aggregates


@dataclass
class EvaluationOutcome:
    run: RunResult
    reason: FailureReason | None
    message: str
    metrics: EvaluatorMetrics | None = None
    unknown_cases: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.reason is None


def run_evaluation_image(runner: Runner, image: str, predictions: Path, dataset: SealedDataset,
                         case_ids: list[str], *, command: tuple[str, ...] | None = None,
                         timeout_seconds: float = 600,
                         memory_bytes: int = 4 << 30, work_dir: Path | None = None,
                         ) -> EvaluationOutcome:
    scratch = Path(tempfile.mkdtemp(prefix="epreuve-eval-", dir=work_dir))
    staged = scratch / "input"
    try:
        _stage(staged, predictions, dataset, case_ids)
        output = scratch / "output"
        run = runner.run(RunSpec(image=image, command=command, input_dir=staged, output_dir=output,
                                 timeout_seconds=timeout_seconds, memory_bytes=memory_bytes,
                                 labels={"org.epreuve.role": "evaluator"}))
        if run.reason in (FailureReason.IMAGE_INVALID, FailureReason.INFRASTRUCTURE):
            # absent, unrunnable, or the platform failed it: never the team's
            return EvaluationOutcome(run, FailureReason.INFRASTRUCTURE,
                                     f"the evaluation image {image} cannot run on this node: "
                                     f"{run.message}")
        if not run.succeeded:
            return EvaluationOutcome(run, run.reason, f"the evaluation image failed: "
                                                      f"{run.message}")
        return _read_metrics(run, output / "metrics.json", case_ids)
    finally:
        unstage(staged)
        shutil.rmtree(scratch, ignore_errors=True)


def _stage(staged: Path, predictions: Path, dataset: SealedDataset, case_ids: list[str]) -> None:
    staged.mkdir(parents=True)
    for case_id in case_ids:
        source = Path(predictions) / case_id
        if source.is_dir():
            stage_tree(source, staged / "predictions" / case_id)
        stage_tree(dataset.root / "ground_truth" / case_id, staged / "ground_truth" / case_id)
    listing = {"cases": [{"case_id": c} for c in case_ids]}
    (staged / "cases.json").write_text(json.dumps(listing, indent=1) + "\n")


def _read_metrics(run: RunResult, path: Path, case_ids: list[str]) -> EvaluationOutcome:
    if not path.is_file() or path.is_symlink():
        return EvaluationOutcome(run, FailureReason.OUTPUT_MISSING,
                                 "the evaluation image wrote no /output/metrics.json")
    if path.stat().st_size > MAX_METRICS_BYTES:
        return EvaluationOutcome(run, FailureReason.OUTPUT_INVALID,
                                 f"/output/metrics.json is larger than {MAX_METRICS_BYTES} bytes")
    try:
        metrics = EvaluatorMetrics.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in
                             exc.errors()[:5])
        return EvaluationOutcome(run, FailureReason.OUTPUT_INVALID,
                                 f"/output/metrics.json does not follow the schema: {problems}")
    unknown = sorted(set(metrics.cases) - set(case_ids))
    for case_id in unknown:
        metrics.cases.pop(case_id)
    return EvaluationOutcome(run, None, "evaluated", metrics, unknown)
