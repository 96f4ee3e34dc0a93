"""Running the organisers' evaluation image (the contract and the metrics' schema are in
engine/scoring/evaluation_image.py; scoring stays pure, so the container run lives here).

The predictions and the reference of the cases to score are staged read-only; the image
runs in the participants' sandbox; `/output/metrics.json` is read as untrusted bytes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from engine.datasets import SealedDataset, stage_tree, unstage
from engine.scoring.evaluation_image import MAX_METRICS_BYTES, EvaluatorMetrics
from runners.base import FailureReason, Runner, RunResult, RunSpec


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
