"""A challenge, as its organisers write it in YAML, validated before anything runs.

Errors name the field and the line of the file it is on, e.g.
`liver.yaml, line 14, phases[0].limits.memory: '4 gigs' is not a size ...`.
Durations are written like "90s", "10m", "2h", "1d"; sizes like "512m", "4g".
Dataset paths are relative to the YAML file.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.outputs import OutputSpec, ProbabilityOutput, SegmentationOutput
from engine.scoring.conventions import EmptyMaskPolicy, larger_is_better
from engine.units import parse_size

SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class ChallengeError(ValueError):
    """The challenge file is not valid; the message names each field and its line."""


def parse_duration(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration: use e.g. 90s, 10m, 2h, 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(Strict):
    path: Path
    version: str | None = Field(None, description="sha256 of the manifest; checked when given")


class Quota(Strict):
    submissions: int = Field(3, ge=1)
    per: float = 86400.0  # seconds

    _per = field_validator("per", mode="before")(lambda v: parse_duration(v))


class Limits(Strict):
    gpus: int = Field(0, ge=0)
    memory: int = 4 << 30
    cpus: float = Field(1.0, gt=0)
    shm: int = 64 << 20
    tmp: int = 256 << 20
    output_quota: int = 1 << 30
    pids: int = Field(256, ge=8)
    time_per_case: float = 300.0
    image_size: int = 20 << 30  # the submitted image's layers, decompressed

    @field_validator("memory", "shm", "tmp", "output_quota", "image_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("time_per_case", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class Visibility(Strict):
    logs: bool = False  # the container's log tail
    per_case: bool = False  # per-case metrics and reasons


class Prize(Strict):
    requires_open_source: bool = False


class Phase(Strict):
    id: str = Field(pattern=SLUG)
    title: str = ""
    dataset: DatasetRef
    opens: datetime | None = None
    closes: datetime | None = None
    quota: Quota = Quota()
    cases_per_run: int = Field(1, ge=1)
    limits: Limits = Limits()
    visibility: Visibility = Visibility()
    sample_cases: list[str] = []  # public cases for a participant's `epreuve check`
    prize: Prize = Prize()
    final: bool = False  # the sealed final test: logs and per-case results are never shown

    @field_validator("opens", "closes")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value

    @model_validator(mode="after")
    def _final_is_sealed(self) -> Phase:
        if self.final and (self.visibility.logs or self.visibility.per_case):
            raise ValueError("a final phase never shows logs or per-case results: set "
                             "visibility.logs and visibility.per_case to false")
        if self.opens and self.closes and self.closes <= self.opens:
            raise ValueError("closes must be after opens")
        return self

    def is_open(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return (self.opens is None or now >= self.opens) and (self.closes is None
                                                              or now < self.closes)

    @property
    def quota_period(self) -> timedelta:
        return timedelta(seconds=self.quota.per)


class MetricRef(Strict):
    metric: str
    label: int | None = None  # segmentation: which label

    @property
    def key(self) -> str:
        return self.metric if self.label is None else f"{self.metric}[{self.label}]"


class EvaluatorMetric(Strict):
    """A metric an organiser's evaluation image reports: its direction and its worst value."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-\[\]]{1,100}$")
    larger_is_better: bool
    worst: float  # what a case without a valid output scores


class Metrics(Strict):
    labels: list[int] = [1]
    nsd_tolerance_mm: float = Field(1.0, ge=0)
    surface: Literal["edge", "subvoxel"] = "edge"
    empty_masks: dict[str, float | Literal["diagonal"]] = {}
    lesion_wise: bool = False
    evaluation_image: str | None = None  # an organiser's image replacing the built-in metrics
    evaluation_image_id: str | None = None  # pinned at `challenge create`: what workers run
    evaluator_metrics: list[EvaluatorMetric] = []  # what that image reports
    classes: list[str] = []  # classification
    threshold: float = Field(0.5, ge=0, le=1)

    @field_validator("empty_masks")
    @classmethod
    def _known_policy(cls, value: dict) -> dict:
        EmptyMaskPolicy(**value)  # unknown keys raise
        return value

    def empty_policy(self) -> EmptyMaskPolicy:
        return EmptyMaskPolicy(**self.empty_masks)


class Ranking(Strict):
    scheme: Literal["aggregate-then-rank", "rank-then-aggregate", "test-based"] = \
        "aggregate-then-rank"
    aggregate: Literal["mean", "median"] = "mean"
    metrics: list[MetricRef] = Field(min_length=1)


class Challenge(Strict):
    id: str = Field(pattern=SLUG)
    title: str
    task: Literal["segmentation", "classification"]
    output: OutputSpec
    metrics: Metrics = Metrics()
    ranking: Ranking
    phases: list[Phase] = Field(min_length=1)

    def larger_is_better(self, metric: str) -> bool:
        for custom in self.metrics.evaluator_metrics:
            if custom.name == metric:
                return custom.larger_is_better
        return larger_is_better(metric)

    @model_validator(mode="after")
    def _consistent(self) -> Challenge:
        if self.metrics.evaluation_image and self.task != "segmentation":
            raise ValueError("evaluation images score per-case outputs: segmentation only")
        if self.metrics.evaluation_image and not self.metrics.evaluator_metrics:
            raise ValueError("metrics.evaluation_image needs metrics.evaluator_metrics: the "
                             "name, direction and worst value of each metric it reports")
        if self.task == "segmentation" and not isinstance(self.output, SegmentationOutput):
            raise ValueError("a segmentation challenge needs output.kind: segmentation")
        if self.task == "classification" and not isinstance(self.output, ProbabilityOutput):
            raise ValueError("a classification challenge needs output.kind: probabilities")
        ids = [phase.id for phase in self.phases]
        if len(set(ids)) != len(ids):
            raise ValueError(f"phase ids must be unique: {ids}")
        return self

    def ranking_problems(self) -> list[tuple[tuple, str]]:
        """(location, message) of each ranking metric that cannot rank."""
        evaluator = {m.name for m in self.metrics.evaluator_metrics}
        problems = []
        for index, ref in enumerate(self.ranking.metrics):
            where = ("ranking", "metrics", index, "metric")
            if self.metrics.evaluation_image:
                if ref.metric not in evaluator or ref.label is not None:
                    problems.append((where, f"{ref.key!r} is not a metric the evaluation image "
                                            f"reports ({', '.join(sorted(evaluator))})"))
                continue
            try:
                larger_is_better(ref.metric)
            except ValueError as exc:
                problems.append((where, str(exc)))
        return problems

    def phase(self, phase_id: str) -> Phase:
        for phase in self.phases:
            if phase.id == phase_id:
                return phase
        raise ChallengeError(f"challenge {self.id} has no phase {phase_id!r} (phases: "
                             f"{', '.join(p.id for p in self.phases)})")


def load_challenge(path: Path) -> Challenge:
    """Parse and validate a challenge file; dataset paths become absolute."""
    path = Path(path)
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ChallengeError(f"{path.name}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ChallengeError(f"{path.name}: expected a mapping at the top level")
    for phase in data.get("phases") or []:
        if isinstance(phase, dict) and isinstance(phase.get("dataset"), dict) and \
                "path" in phase["dataset"]:
            phase["dataset"]["path"] = str((path.parent / phase["dataset"]["path"]).resolve())
    try:
        challenge = Challenge.model_validate(data)
    except ValidationError as exc:
        raise ChallengeError("\n".join(_describe(path.name, node, error)
                                       for error in exc.errors())) from None
    problems = challenge.ranking_problems()
    if problems:
        raise ChallengeError("\n".join(_describe(path.name, node, {"loc": loc, "msg": msg})
                                       for loc, msg in problems))
    return challenge


def _describe(filename: str, root: yaml.Node | None, error: dict) -> str:
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part in (
        "segmentation", "probabilities"))]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    line = _line_of(root, loc)
    message = error["msg"].removeprefix("Value error, ")
    prefix = f"{filename}, line {line}" if line else filename
    return f"{prefix}, {where or 'top level'}: {message}"


def _line_of(node: yaml.Node | None, loc: list) -> int | None:
    """The 1-based line of the deepest node of `loc` found in the composed YAML."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(
                node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
