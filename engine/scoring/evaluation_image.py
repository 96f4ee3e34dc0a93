"""An organiser's own evaluation image, instead of the built-in metrics: what it must
write (the schema, checked here) and how it is pinned. Running it is a container's
business: engine/evaluation_image.py.

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

import math
import re

from pydantic import BaseModel, field_validator

from engine.errors import EpreuveError

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
