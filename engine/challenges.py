"""A challenge, as its organisers write it in YAML, validated whole before anything runs.

Errors name the field and the line of the file it is on, e.g.
`liver.yaml, line 14, phases[0].limits.memory: '4 gigs' is not a size ...`.
Durations are written like "90s", "10m", "2h", "1d"; sizes like "512m", "4g".
Dataset paths are relative to the YAML file.

Every field carries its meaning, unit and allowed range (`Field(description=...)` and
`json_schema_extra`): the same declaration validates the file and generates the
reference (`epreuve challenge schema`, docs/challenge-file.md), so the two cannot drift.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.datasets import CLASS_LABEL  # one spelling of a class: here and in labels.csv
from engine.errors import EpreuveError
from engine.outputs import (
    SEGMENTATION_READERS,
    TABLE_SUFFIXES,
    ProbabilityOutput,
    SegmentationOutput,
)
from engine.scoring.conventions import SEGMENTATION_METRICS, EmptyMaskPolicy, larger_is_better
from engine.units import parse_size
from runners.messages import human_bytes

SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_FILE_BYTES = 1 << 20
# output files the engine reads back (.mhd is left out: its header names a second file)
SEGMENTATION_EXTENSIONS = tuple(SEGMENTATION_READERS)  # one allow-list: the readers'
PROBABILITY_EXTENSIONS = TABLE_SUFFIXES
GIB, TIB = 1 << 30, 1 << 40


class ChallengeError(EpreuveError, ValueError):
    """The challenge file is not valid; the message names each field and its line."""


def parse_duration(value: str | int | float) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration: use e.g. 90s, 10m, 2h, 1d")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration: use e.g. 90s, 10m, 2h, 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _parse_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a size: use e.g. 512m, 2g")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{value!r} is not a whole number of bytes: use e.g. 512m, 2g")
        return int(value)
    return parse_size(value)


def human_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def yaml_size(value: int) -> str:
    """A byte count as it would be written in a challenge file: 2g, 512m, or bytes."""
    for unit, power in (("t", 4), ("g", 3), ("m", 2), ("k", 1)):
        if value >= 1024 ** power and value % 1024 ** power == 0:
            return f"{value // 1024 ** power}{unit}"
    return str(value) if abs(value) < 1024 else f"{value} ({human_bytes(value)})"


def _show(value: Any, kind: str | None) -> str:
    if kind == "size":
        return yaml_size(value)
    if kind == "duration":
        return human_seconds(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def field(default: Any, meaning: str, *, unit: str | None = None, minimum: float | None = None,
          maximum: float | None = None, kind: str | None = None, **kwargs: Any) -> Any:
    """A documented field: its meaning, unit, range and YAML kind ("size", "duration")
    drive validation here and the generated reference alike."""
    extra = {key: value for key, value in (("unit", unit), ("minimum", minimum),
                                           ("maximum", maximum), ("kind", kind))
             if value is not None}
    return Field(default, description=meaning, json_schema_extra=extra or None, **kwargs)


def _extra(model: type[BaseModel], name: str) -> dict:
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _parse_units(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (
            int, float, "int", "float"):
        raise ValueError(f"{str(value).lower()} is not a number")
    kind = _extra(cls, info.field_name).get("kind")
    if kind == "size":
        return _parse_size(value)
    if kind == "duration":
        return parse_duration(value)
    return value


def _in_range(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    extra = _extra(cls, info.field_name)
    if isinstance(value, bool) or not isinstance(value, int | float) or _stored(info):
        return value
    low, high = extra.get("minimum"), extra.get("maximum")
    if (low is not None and value < low) or (high is not None and value > high):
        kind = extra.get("kind")
        raise ValueError(f"{_show(value, kind)} is outside the allowed range "
                         f"{_show(low, kind)} to {_show(high, kind)}")
    return value


def _stored(info: ValidationInfo) -> bool:
    """A definition read back from the database: it was checked when it was registered
    (perhaps under older bounds), and must stay readable for its submissions' reports."""
    return bool((info.context or {}).get("stored"))


STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
# Text an organiser types is printed in terminals and pages: no control characters (terminal
# escapes, NUL, line breaks) and no invisible direction or zero-width marks.
HIDDEN_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e"
                               r"\u2066-\u2069\ufeff]")


def _plain_text(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    texts = value if isinstance(value, list) else [value]
    for text in texts:
        if isinstance(text, str) and not _stored(info) and HIDDEN_CHARACTERS.search(text):
            raise ValueError(f"{text[:60]!r} holds a control or invisible character")
    return value


class Strict(BaseModel):
    model_config = STRICT
    _units = field_validator("*", mode="before")(_parse_units)
    _range = field_validator("*", mode="after")(_in_range)
    _text = field_validator("*", mode="after")(_plain_text)


# -- output ------------------------------------------------------------------------------


class SegmentationSpec(SegmentationOutput):
    """What each case's output must be: one label map per case."""

    model_config = STRICT
    _units = field_validator("max_voxel_bytes", mode="before")(_parse_units)
    _range = field_validator("max_voxel_bytes", mode="after")(_in_range)
    kind: Literal["segmentation"] = field("segmentation", "segmentation: one label map per "
                                          "case, at /output/<case_id>/<filename>")
    filename: str = field("mask.nii.gz", "the file each case writes, a plain name: "
                          + ", ".join(SEGMENTATION_EXTENSIONS))
    labels: list[StrictInt] = field([0, 1], "every label value allowed in a mask (background "
                              "included)", min_length=1, max_length=256)
    max_voxel_bytes: int = field(2 * GIB, "the most voxel data a mask may declare in its "
                                 "header (refused before it is read)", unit="bytes",
                                 kind="size", minimum=1, maximum=64 * GIB)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[int]) -> list[int]:
        return _unique_labels(labels)


class ProbabilitySpec(ProbabilityOutput):
    """One table for all cases: a row per case, a probability per class."""

    model_config = STRICT
    kind: Literal["probabilities"] = field("probabilities", "probabilities: one table "
                                           "/output/<filename> with a row per case")
    filename: str = field("predictions.csv", "the table's file name: "
                          + ", ".join(PROBABILITY_EXTENSIONS))
    classes: list[str] = field(["probability"], "the table's columns besides case_id; one "
                               "column is a binary task (probability of the positive class)",
                               min_length=1, max_length=1000)

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[str]) -> list[str]:
        for name in classes:
            if not CLASS_LABEL.match(name) or name == "case_id":
                raise ValueError(f"class {name!r}: use letters, digits, '.', '_', '-' (not "
                                 "case_id)")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be unique: {classes}")
        return classes


OutputSpec = Annotated[SegmentationSpec | ProbabilitySpec, Field(discriminator="kind")]


def _unique_labels(labels: list[int]) -> list[int]:
    outside = [label for label in labels if not 0 <= label <= 65535]
    if outside:
        raise ValueError(f"labels {outside} are outside the allowed range 0 to 65535")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique: {labels}")
    return labels


# -- phases --------------------------------------------------------------------------------


class DatasetRef(Strict):
    """A sealed dataset (`epreuve dataset seal`)."""

    path: Path = field(..., "the dataset's directory, relative to the challenge file")
    version: str | None = field(None, "the manifest's sha256 (`seal` prints it); "
                                "registration fails when the sealed dataset differs",
                                pattern=r"^[0-9a-f]{64}$")


class Quota(Strict):
    """How many submissions a team may make per period (platform failures do not count)."""

    submissions: int = field(3, "submissions per team per period", minimum=1, maximum=1000)
    per: float = field(86400.0, "the period, a sliding window", unit="seconds",
                       kind="duration", minimum=60, maximum=366 * 86400)


class Limits(Strict):
    """The sandbox of every run: the same for `check`, the smoke job and the main jobs."""

    gpus: int = field(0, "whole GPUs per run", minimum=0, maximum=16)
    memory: int = field(4 * GIB, "memory limit, no swap (the /tmp tmpfs is charged to it)",
                        unit="bytes", kind="size", minimum=16 << 20, maximum=TIB)
    cpus: float = field(1.0, "CPU quota in cores", unit="cores", minimum=0.01, maximum=256)
    shm: int = field(64 << 20, "size of /dev/shm", unit="bytes", kind="size",
                     minimum=1 << 20, maximum=TIB)
    tmp: int = field(256 << 20, "size of the /tmp tmpfs", unit="bytes", kind="size",
                     minimum=1 << 20, maximum=TIB)
    output_quota: int = field(GIB, "the most a run may write to /output", unit="bytes",
                              kind="size", minimum=1 << 20, maximum=TIB)
    pids: int = field(256, "most processes and threads at once", minimum=16, maximum=65536)
    time_per_case: float = field(300.0, "wall time per case; a run of n cases gets n times "
                                 "this", unit="seconds", kind="duration", minimum=1,
                                 maximum=86400)
    image_size: int = field(20 * GIB, "the submitted image's layers, decompressed (counted "
                            "while the archive is read)", unit="bytes", kind="size",
                            minimum=1 << 20, maximum=TIB)


class Visibility(Strict):
    """What a participant sees of their own submission (organisers see everything)."""

    logs: bool = field(False, "the tail of the container's log")
    per_case: bool = field(False, "per-case metrics and failure messages; without it a "
                           "failure message names no case and none of its data")


class Prize(Strict):
    requires_open_source: bool = field(False, "prize eligibility needs a public source URL "
                                       "and an OSI license (SPDX id); others are still run")


class Phase(Strict):
    """One leaderboard: a dataset, a window, a quota, limits and what participants see."""

    id: str = field(..., "short name: lowercase letters, digits, '-'", pattern=SLUG)
    title: str = field("", "shown to participants", max_length=300)
    dataset: DatasetRef = field(..., "the sealed test set")
    opens: datetime | None = field(None, "first moment submissions are accepted (ISO 8601; "
                                   "UTC unless a zone is given); none: open now")
    closes: datetime | None = field(None, "submissions are refused from this moment (after "
                                    "`opens`); none: never closes")
    quota: Quota = field(Quota(), "submissions per team and period")
    cases_per_run: int = field(1, "cases per container run after the smoke job", minimum=1,
                               maximum=10000)
    limits: Limits = field(Limits(), "the sandbox's limits")
    visibility: Visibility = field(Visibility(), "what participants see")
    sample_cases: list[str] = field([], "public cases of the dataset: `epreuve check` runs "
                                    "them, and the smoke job runs the first one",
                                    max_length=100)
    prize: Prize = field(Prize(), "prize rules")
    final: bool = field(False, "the sealed final test: logs and per-case results are never "
                        "shown")

    @field_validator("opens", "closes", mode="before")
    @classmethod
    def _dates(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        return value

    @field_validator("opens", "closes")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value

    def problems(self) -> list[tuple[tuple, str]]:
        found = []
        if self.final and (self.visibility.logs or self.visibility.per_case):
            found.append((("visibility",), "a final phase never shows logs or per-case "
                          "results: set visibility.logs and visibility.per_case to false"))
        if self.opens and self.closes and self.closes <= self.opens:
            found.append((("closes",), f"closes ({self.closes:%Y-%m-%d %H:%M} UTC) must be "
                          f"after opens ({self.opens:%Y-%m-%d %H:%M} UTC)"))
        if len(set(self.sample_cases)) != len(self.sample_cases):
            found.append((("sample_cases",), f"sample cases must be unique: {self.sample_cases}"))
        return found

    @property
    def hides_cases(self) -> bool:
        """Participants see nothing about single cases: no id, shape, spacing or value."""
        return self.final or not self.visibility.per_case

    def is_open(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return (self.opens is None or now >= self.opens) and (self.closes is None
                                                              or now < self.closes)

    @property
    def quota_period(self) -> timedelta:
        return timedelta(seconds=self.quota.per)


# -- metrics and ranking ---------------------------------------------------------------------


class MetricRef(Strict):
    metric: str = field(..., "a metric the challenge computes (see metrics)", max_length=100)
    label: StrictInt | None = field(None, "segmentation: which label (one of metrics.labels)")

    @property
    def key(self) -> str:
        return self.metric if self.label is None else f"{self.metric}[{self.label}]"


class EvaluatorMetric(Strict):
    """A metric an organiser's evaluation image reports: its direction and its worst value."""

    name: str = field(..., "the key in the image's metrics.json",
                      pattern=r"^[A-Za-z0-9_.\-\[\]]{1,100}$")
    larger_is_better: bool = field(..., "its ranking direction")
    worst: float = field(..., "what a case without a valid output scores")


def _fill(value: Any) -> Any:
    if value == "diagonal" or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{value!r} is neither a distance in mm nor 'diagonal'")


Fill = float | Literal["diagonal"]


class EmptyMasks(Strict):
    """Metric values when a label is absent (conventions.py); never nan, never dropped."""

    both_empty_overlap: float = field(1.0, "Dice and IoU when neither mask has the label",
                                      minimum=0, maximum=1)
    both_empty_nsd: float = field(1.0, "NSD when neither mask has the label", minimum=0,
                                  maximum=1)
    both_empty_distance: Fill = field(0.0, "HD, HD95, ASSD, MASD when neither mask has the "
                                      "label: mm, or 'diagonal' (the image's diagonal)",
                                      unit="mm", minimum=0, maximum=1e6)
    one_empty_overlap: float = field(0.0, "Dice and IoU when only one mask has the label",
                                     minimum=0, maximum=1)
    one_empty_nsd: float = field(0.0, "NSD when only one mask has the label", minimum=0,
                                 maximum=1)
    one_empty_distance: Fill = field("diagonal", "HD, HD95, ASSD, MASD when only one mask has "
                                     "the label: mm, or 'diagonal'", unit="mm", minimum=0,
                                     maximum=1e6)

    _fills = field_validator("both_empty_distance", "one_empty_distance", mode="before")(
        lambda value: _fill(value))

    def policy(self) -> EmptyMaskPolicy:
        return EmptyMaskPolicy(**self.model_dump())


class ReproductionTolerance(Strict):
    """How far one metric of a re-run (`epreuve reproduce`) may move from the recorded value
    and still count as reproduced."""

    metric: str = field(..., "a metric name (`dice`: every label), a key with its label "
                        "(`dice[1]`), or an evaluator metric's name",
                        pattern=r"^[A-Za-z0-9_.\-\[\]]{1,100}$")
    absolute: float = field(..., "the largest absolute difference still counted as equal",
                            minimum=0, maximum=1e9)


DEFAULT_REPRODUCTION_TOLERANCE = 1e-6


class Metrics(Strict):
    """How each case is scored."""

    labels: list[StrictInt] = field([1], "segmentation: the labels scored, each one of "
                              "output.labels", min_length=1, max_length=256)
    nsd_tolerance_mm: float = field(1.0, "NSD's tolerance", unit="mm", minimum=0,
                                    maximum=1000)
    surface: Literal["edge", "subvoxel"] = field("edge", "surface extraction: edge (MONAI) "
                                                 "or subvoxel (DeepMind surface-distance)")
    empty_masks: EmptyMasks = field(EmptyMasks(), "values when a label is absent")
    lesion_wise: bool = field(False, "also BraTS-2023 lesion_dice and lesion_hd95")
    evaluation_image: str | None = field(None, "an organiser's image replacing the built-in "
                                         "metrics (loaded on every worker node)",
                                         max_length=300)
    evaluation_image_id: str | None = field(None, "set by `challenge create`: the id the "
                                            "evaluation image was pinned to, which the workers "
                                            "run (leave it out: a typed value is replaced)",
                                            max_length=100)
    evaluator_metrics: list[EvaluatorMetric] = field([], "what that image reports",
                                                     max_length=100)
    classes: list[str] = field([], "unused; classes are output.classes", max_length=0)
    threshold: float = field(0.5, "classification: probability from which a case is "
                             "positive", minimum=0, maximum=1)
    reproduction_tolerance: float = field(
        DEFAULT_REPRODUCTION_TOLERANCE, "`epreuve reproduce`: the largest absolute difference "
        "of a metric between a re-run and the recorded run still counted as equal, for every "
        "metric not listed in reproduction_tolerances", minimum=0, maximum=1e9)
    reproduction_tolerances: list[ReproductionTolerance] = field(
        [], "a tolerance per metric, in place of reproduction_tolerance (a key with its label "
        "wins over the metric's name)", max_length=200)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[int]) -> list[int]:
        return _unique_labels(labels)

    def empty_policy(self) -> EmptyMaskPolicy:
        return self.empty_masks.policy()

    def tolerance(self, key: str) -> float:
        """The reproduction tolerance of a metric key (`dice[1]`, `auc`)."""
        given = {t.metric: t.absolute for t in self.reproduction_tolerances}
        name = key.split("[", 1)[0]
        return given.get(key, given.get(name, self.reproduction_tolerance))


class Ranking(Strict):
    """How the leaderboard orders teams (challengeR's schemes)."""

    scheme: Literal["aggregate-then-rank", "rank-then-aggregate", "test-based"] = field(
        "aggregate-then-rank", "how per-case values become ranks")
    aggregate: Literal["mean", "median"] = field("mean", "the per-team aggregate")
    metrics: list[MetricRef] = field(..., "ranked metrics; several: consensus (mean rank)",
                                     min_length=1, max_length=20)


class Challenge(Strict):
    """The whole challenge file."""

    id: str = field(..., "short name used on the command line", pattern=SLUG)
    title: str = field(..., "shown to participants", min_length=1, max_length=300)
    task: Literal["segmentation", "classification"] = field(..., "what is predicted")
    output: OutputSpec = field(..., "what a submission must write")
    metrics: Metrics = field(Metrics(), "how each case is scored")
    ranking: Ranking = field(..., "how teams are ranked")
    phases: list[Phase] = field(..., "the phases, each its own leaderboard", min_length=1,
                                max_length=50)

    def larger_is_better(self, metric: str) -> bool:
        for custom in self.metrics.evaluator_metrics:
            if custom.name == metric:
                return custom.larger_is_better
        return larger_is_better(metric)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Challenge:
        if (info.context or {}).get("located") or _stored(info):
            return self  # load_challenge reports them with their lines
        found = self.problems()
        if found:
            raise ValueError("; ".join(f"{_where(loc)}: {message}" for loc, message in found))
        return self

    def problems(self) -> list[tuple[tuple, str]]:
        """(location, message) of everything that is wrong across fields."""
        found = []
        if self.metrics.evaluation_image and self.task != "segmentation":
            found.append((("metrics", "evaluation_image"), "evaluation images score per-case "
                          "outputs: segmentation only"))
        if self.metrics.evaluation_image and not self.metrics.evaluator_metrics:
            found.append((("metrics", "evaluation_image"), "metrics.evaluation_image needs "
                          "metrics.evaluator_metrics: the name, direction and worst value of "
                          "each metric it reports"))
        wanted = {"segmentation": "segmentation", "classification": "probabilities"}[self.task]
        if self.output.kind != wanted:
            return [(("output", "kind"), f"a {self.task} challenge needs output.kind: "
                     f"{wanted}")]
        if isinstance(self.output, SegmentationOutput) and not self.metrics.evaluation_image:
            unknown = sorted(set(self.metrics.labels) - set(self.output.labels))
            if unknown:
                found.append((("metrics", "labels"), f"labels {unknown} are not in "
                              f"output.labels {self.output.labels}"))
        names = [m.name for m in self.metrics.evaluator_metrics]
        if len(set(names)) != len(names):
            found.append((("metrics", "evaluator_metrics"), f"names must be unique: {names}"))
        seen: set[str] = set()
        for index, phase in enumerate(self.phases):
            if phase.id in seen:
                found.append((("phases", index, "id"), f"phase id {phase.id!r} is used twice"))
            seen.add(phase.id)
            found += [(("phases", index, *loc), message) for loc, message in phase.problems()]
        return found + self.ranking_problems()

    def computed_metrics(self) -> list[str]:
        """The metric names every case (or, for classification, the phase) gets: taken from
        the scoring code itself, so a ranking can only name what is computed."""
        if self.metrics.evaluation_image:
            return [m.name for m in self.metrics.evaluator_metrics]
        if self.task == "classification":
            return _classification_metrics(self.output.classes)
        return list(dict.fromkeys(key.split("[")[0] for key in metric_keys(
            self.model_copy(update={"metrics": self.metrics.model_copy(
                update={"labels": [0]})}))))

    def ranking_problems(self) -> list[tuple[tuple, str]]:
        """(location, message) of each ranking metric that cannot rank."""
        problems = []
        for index, ref in enumerate(self.ranking.metrics):
            problem = self._ranking_problem(ref)
            if problem:
                problems.append((("ranking", "metrics", index, problem[0]), problem[1]))
        return problems

    def _ranking_problem(self, ref: MetricRef) -> tuple[str, str] | None:
        known = self.computed_metrics()
        if self.metrics.evaluation_image:
            if ref.metric not in known or ref.label is not None:
                return "metric", (f"{ref.key!r} is not a metric the evaluation image reports "
                                  f"({', '.join(sorted(known))})")
            return None
        if ref.metric not in known:
            return "metric", _unknown_metric(ref.metric, known, self)
        try:
            larger_is_better(ref.metric)
        except ValueError as exc:
            return "metric", str(exc)
        if self.task == "classification" and ref.label is not None:
            return "label", "classification metrics take no label: name the class in the " \
                            "metric, e.g. roc_auc[tumour]"
        if self.task == "segmentation" and ref.label is None:
            return "metric", (f"{ref.metric!r} needs a label: one of metrics.labels "
                              f"{self.metrics.labels}")
        if self.task == "segmentation" and ref.label not in self.metrics.labels:
            return "label", (f"label {ref.label} is not scored: metrics.labels is "
                             f"{self.metrics.labels}")
        return None

    def phase(self, phase_id: str) -> Phase:
        for phase in self.phases:
            if phase.id == phase_id:
                return phase
        raise ChallengeError(f"challenge {self.id} has no phase {phase_id!r} (phases: "
                             f"{', '.join(p.id for p in self.phases)})")


def _classification_metrics(classes: list[str]) -> list[str]:
    """The keys the classification scorer returns for these classes (run on two cases)."""
    import numpy as np

    from engine.scoring.classification import binary_metrics, multiclass_metrics

    if len(classes) == 1:
        return list(binary_metrics(np.array([True, False]), np.array([0.9, 0.1])))
    probabilities = np.full((len(classes), len(classes)), 1.0 / len(classes))
    return list(multiclass_metrics(list(classes), probabilities, list(classes)))


def _unknown_metric(name: str, known: list[str], challenge: Challenge) -> str:
    hint = ""
    if name.startswith("lesion_") and not challenge.metrics.lesion_wise:
        hint = "; lesion-wise metrics need metrics.lesion_wise: true"
    else:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown metric {name!r}; known: {', '.join(known)}{hint}"


# -- loading --------------------------------------------------------------------------------


def load_challenge(path: Path) -> Challenge:
    """Parse and validate a challenge file; dataset paths become absolute."""
    return load_challenge_file(path)[0]


def load_challenge_file(path: Path) -> tuple[Challenge, Locator]:
    """The challenge and a locator that turns (location, message) into `file, line N, ...`.
    Relative dataset paths are read from the file's directory."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ChallengeError(f"{path.name}: larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChallengeError(f"{path.name}: not UTF-8 text") from None
    except OSError as exc:
        raise ChallengeError(f"{path.name}: cannot be read ({exc.strerror})") from None
    return load_challenge_text(text, path.name, path.parent)


def load_challenge_text(text: str, name: str, base: Path) -> tuple[Challenge, Locator]:
    """A challenge from its YAML text (a file's, or a request body's): `name` is shown in
    messages, relative dataset paths are read from `base`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ChallengeError(f"{name}: larger than {MAX_FILE_BYTES} bytes")
    try:
        _no_aliases(text)
        node = yaml.compose(text)
        _no_duplicate_keys(node)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ChallengeError(f"{name}: not valid YAML: {exc}") from None
    except ChallengeError:
        raise
    except ValueError as exc:  # a constructor's own limit, e.g. an integer of 5,000 digits
        raise ChallengeError(f"{name}: a value cannot be read ({exc})") from None
    except RecursionError:  # the composer recurses once per level: [[[[...]]]] a mile deep
        raise ChallengeError(f"{name}: nested too deeply to be a challenge file") \
            from None
    locator = Locator(name, node)
    if not isinstance(data, dict):
        raise ChallengeError(f"{name}: expected a mapping at the top level")
    phases = data.get("phases")
    for phase in phases if isinstance(phases, list) else []:
        if isinstance(phase, dict) and isinstance(phase.get("dataset"), dict) and \
                isinstance(phase["dataset"].get("path"), str):
            try:
                phase["dataset"]["path"] = str((base / phase["dataset"]["path"]).resolve())
            except (ValueError, OSError):  # a NUL byte, a link loop
                raise ChallengeError(f"{name}: dataset path {phase['dataset']['path'][:80]!r} "
                                     "is not a usable path") from None
    try:
        challenge = Challenge.model_validate(data, context={"located": True})
    except ValidationError as exc:
        raise ChallengeError("\n".join(locator.describe(error["loc"], _message(error))
                                       for error in exc.errors())) from None
    problems = challenge.problems()
    if problems:
        raise ChallengeError("\n".join(locator.describe(loc, message)
                                       for loc, message in problems))
    return challenge, locator


def _no_aliases(text: str) -> None:
    """Plain YAML only. A few lines of anchors and aliases can expand to gigabytes; a tag
    (`!!python/object`, `!!binary`, `!!set`) makes a value of a type the file does not show:
    each is refused, by line."""
    for token in yaml.scan(text):
        if isinstance(token, yaml.AliasToken | yaml.AnchorToken):
            raise ChallengeError(f"line {token.start_mark.line + 1}: anchors and aliases "
                                 "(&, *) are not supported in challenge files")
        if isinstance(token, yaml.TagToken):
            raise ChallengeError(f"line {token.start_mark.line + 1}: YAML tags (!, !!) are "
                                 "not supported in challenge files: write the plain value")


def _no_duplicate_keys(node: yaml.Node | None) -> None:
    """YAML keeps the last of two equal keys silently: refused, by line."""
    if isinstance(node, yaml.MappingNode):
        keys: set = set()
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<`: keys that hide one another
                raise ChallengeError(f"line {key.start_mark.line + 1}: merge keys (<<) are not "
                                     "supported in challenge files: write each key once")
            if isinstance(key, yaml.ScalarNode) and key.value in keys:
                raise ChallengeError(f"line {key.start_mark.line + 1}: key {key.value!r} is "
                                     "given twice")
            keys.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
            _no_duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item)


_TAGS = re.compile(r"^(segmentation|probabilities|float|int|str|bool|none|"
                   r"literal\[.*\]|function-\w+\[.*\]|[a-z-]+\[.*\])$")


def _clean(loc: tuple) -> list:
    """The location as the organiser wrote it: without pydantic's union tags."""
    return [part for part in loc if not (isinstance(part, str) and _TAGS.match(part))]


def _where(loc: tuple | list) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return where or "top level"


def _message(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _known_keys(error["loc"][:-1])
        return f"unknown key {error['loc'][-1]!r}" + (f"; known: {', '.join(known)}"
                                                      if known else "")
    if kind == "missing":
        return "required, but missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind != "value_error" and not isinstance(error.get("input"), dict | list):
        message += f" (got {error.get('input')!r})"
    return message


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed at `loc` (pydantic's, union tags included), walking the models."""
    annotation: Any = Challenge
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    return list(annotation.model_fields) if _is_model(annotation) else []


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _step(annotation: Any, part: Any) -> Any:
    members = [annotation, *typing.get_args(annotation)]
    models = [m for m in members if _is_model(m)]
    if isinstance(part, int):
        return typing.get_args(annotation)[0] if typing.get_origin(annotation) is list \
            else None
    for model in models:  # a union tag ("segmentation") picks its member
        if "kind" in model.model_fields and model.model_fields["kind"].default == part:
            return model
    for model in models:
        if part in model.model_fields:
            return model.model_fields[part].annotation
    return annotation if _TAGS.match(part) else None


class Locator:
    """Where a field is in the file: its YAML line."""

    def __init__(self, filename: str, root: yaml.Node | None) -> None:
        self.filename, self.root = filename, root

    def describe(self, loc: tuple | list, message: str) -> str:
        loc = _clean(tuple(loc))
        line = _line_of(self.root, loc)
        prefix = f"{self.filename}, line {line}" if line else self.filename
        return f"{prefix}, {_where(loc)}: {message}"


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


LESION_METRICS = ("lesion_dice", "lesion_hd95")


def challenge_definition(row) -> Challenge:
    """A stored definition (a challenge row's `definition`): checked in full when it was
    registered; read back leniently (bounds may have tightened since) so that its
    submissions' reports stay readable."""
    return Challenge.model_validate(row.definition, context={"stored": True})


def metric_keys(challenge: Challenge) -> list[str]:
    if challenge.task == "classification":
        return []
    if challenge.metrics.evaluation_image:
        return [m.name for m in challenge.metrics.evaluator_metrics]
    names = list(SEGMENTATION_METRICS) + (list(LESION_METRICS) if
                                          challenge.metrics.lesion_wise else [])
    return [f"{name}[{label}]" for label in challenge.metrics.labels for name in names]
