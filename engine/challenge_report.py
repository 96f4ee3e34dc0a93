"""`epreuve report`: one phase as a self-contained HTML file for the challenge paper.

The leaderboard exactly as engine/leaderboard.py computes it (the same teams, the
same scores and ranks), each metric's 95% bootstrap interval and failed-case count
from the stored aggregates, runtime and GPU energy, and the figures of
engine/plots.py inline as SVG. No script, no external resource: the file opens
offline and prints as it shows.

It is an organiser's document: the figures are drawn from per-case values (no case
is named, no log or message is quoted), and the file says so at the top; for a
phase whose participants never see per-case results it says that too, so that
it is not published by mistake.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import plots
from engine.datasets import load
from engine.db.models import AggregateRow, JobRow, SubmissionRow
from engine.leaderboard import Entry, latest_per_team, leaderboard, stability
from engine.results import case_values, results_by_case
from engine.submissions import challenge_definition, find_phase

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_RESAMPLES = 1000


@dataclass
class Row:
    """One leaderboard line as the report prints it."""

    entry: Entry
    intervals: dict[str, tuple[float, float] | None]  # metric key -> 95% CI of the mean
    n_cases: int | None
    energy_joules: float | None


@dataclass
class Figure:
    title: str
    caption: str
    svg: str  # from engine/plots.py: matplotlib escapes the text in it


@dataclass
class Report:
    challenge_id: str
    challenge_title: str
    phase_slug: str
    phase_title: str
    hides_cases: bool
    metric_keys: list[str]
    rows: list[Row]
    scheme: str
    aggregate: str
    figures: list[Figure] = field(default_factory=list)
    stability_tau: float | None = None
    resamples: int = 0


def energy_joules(jobs: list[JobRow]) -> float | None:
    """GPU energy of a submission: every job's run, every GPU it held (the worker records
    NVML's counter difference per GPU in run_result["gpus"]); None without any reading."""
    readings = [usage.get("energy_joules") for job in jobs
                for usage in ((job.run_result or {}).get("gpus") or {}).values()
                if isinstance(usage, dict)]
    readings = [float(r) for r in readings
                if isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r)]
    return sum(readings) if readings else None


def _interval(summary: dict | None) -> tuple[float, float] | None:
    if not summary or "ci_low" not in summary:
        return None
    return float(summary["ci_low"]), float(summary["ci_high"])


def table_rows(session: Session, entries: list[Entry], submissions: dict[int, SubmissionRow],
               keys: list[str]) -> list[Row]:
    """The leaderboard's lines with their intervals, case counts and GPU energy (the report
    and the web leaderboard print the same table)."""
    rows = []
    for entry in entries:
        summaries = {a.metric: a.summary for a in session.scalars(
            select(AggregateRow).where(AggregateRow.submission_id == entry.submission_id))}
        n_cases = max((s.get("n", 0) for s in summaries.values()), default=None)
        rows.append(Row(entry, {k: _interval(summaries.get(k)) for k in keys}, n_cases,
                        energy_joules(submissions[entry.submission_id].jobs)))
    return rows


def gather(session: Session, challenge_id: str, phase_slug: str, *,
           resamples: int = DEFAULT_RESAMPLES) -> Report:
    phase_row, phase = find_phase(session, challenge_id, phase_slug)
    challenge = challenge_definition(phase_row.challenge)
    entries = leaderboard(session, challenge_id, phase_slug)
    submissions = {s.id: s for s in latest_per_team(session, phase_row.id)}
    keys = [ref.key for ref in challenge.ranking.metrics]
    rows = table_rows(session, entries, submissions, keys)
    report = Report(challenge_id, phase_row.challenge.title, phase_slug, phase.title or "",
                    phase.hides_cases, keys, rows, challenge.ranking.scheme,
                    challenge.ranking.aggregate)
    if not entries:
        return report
    if challenge.task != "classification":
        dataset = load(phase_row.dataset_path)
        case_rows = {s: results_by_case(session, submissions[s]) for s in submissions}
        for ref in challenge.ranking.metrics:
            values = {e.team: case_values(session, challenge, dataset,
                                          submissions[e.submission_id], ref.key,
                                          case_rows[e.submission_id]) for e in entries}
            report.figures += _metric_figures(ref.key, values,
                                              challenge.larger_is_better(ref.metric))
        if len(entries) > 1 and resamples > 0:
            firmness = stability(session, challenge_id, phase_slug, resamples=resamples)
            report.stability_tau = firmness["kendall_tau_mean"]
            report.resamples = resamples
            report.figures += _stability_figures(firmness, {e.team: e.rank for e in entries})
    report.figures.append(Figure(
        "Runtime and GPU energy",
        "Mean runtime per case (s) and the GPU energy of all the submission's runs (J), "
        "from NVML's energy counter; n/a where no GPU was used or none could be read.",
        plots.runtime_and_energy({e.team: e.runtime_per_case for e in entries},
                                 {r.entry.team: r.energy_joules for r in rows})))
    return report


def _metric_figures(key: str, values: dict[str, list[float]], larger: bool) -> list[Figure]:
    better = "larger" if larger else "smaller"
    return [
        Figure(f"{key}: per-case distribution",
               "Each dot is one case; failed cases count at the metric's worst value. "
               f"{better.capitalize()} is better.",
               plots.metric_distributions(values, key)),
        Figure(f"{key}: podium",
               "Each case ranks the teams; a team's value on a case stands in the column of "
               "its rank on that case; grey lines join the values of one case.",
               plots.podium(values, key, larger)),
        Figure(f"{key}: ranking heatmap",
               "Share of the cases on which each team took each rank (ties at their best).",
               plots.ranking_heatmap(plots.rank_shares(values, larger),
                                     f"{key}: ranks per case")),
    ]


def _stability_figures(firmness: dict, full_ranks: dict[str, int]) -> list[Figure]:
    frequencies = firmness["rank_frequencies"]
    ordered = dict(sorted(frequencies.items(), key=lambda kv: (full_ranks.get(kv[0], 0),
                                                              kv[0])))
    return [
        Figure("Ranking stability (bootstrap)",
               f"Cases resampled {firmness['resamples']} times (seed {firmness['seed']}), "
               f"the full ranking scheme re-run on each sample; Kendall's tau against the "
               f"full ranking: mean {firmness['kendall_tau_mean']:.3f}.",
               plots.rank_stability(frequencies, full_ranks, firmness["resamples"])),
        Figure("Ranking heatmap (bootstrap)",
               "Share of the bootstrap samples in which each team took each final rank.",
               plots.ranking_heatmap(ordered, "final rank over bootstrap samples")),
    ]


def unique_ids(svg: str, prefix: str) -> str:
    """An SVG from engine/plots.py with its ids made unique within the page (the figures share
    matplotlib's ids: figure_1, the clip paths). Only the tags are rewritten, never the text
    between them (a team's name stays as it is; matplotlib escapes `<` and `>` in it)."""
    def in_tag(match: re.Match) -> str:
        tag = re.sub(r'\bid="', f'id="{prefix}', match.group())
        tag = re.sub(r"url\(#", f"url(#{prefix}", tag)
        return re.sub(r'href="#', f'href="#{prefix}', tag)

    return re.sub(r"<[^<>]*>", in_tag, svg)


def _described(svg: str, number: int) -> str:
    """A screen reader announces the figure by its caption."""
    return svg.replace("<svg ", f'<svg role="img" aria-labelledby="caption-{number}" ', 1)


def render(report: Report) -> str:
    environment = Environment(loader=FileSystemLoader(TEMPLATES),
                              autoescape=select_autoescape(default=True),
                              keep_trailing_newline=True)
    environment.filters["inert"] = plots.label
    # trusted markup: matplotlib wrote it and escaped every text in it (names included)
    figures = [(figure, Markup(_described(unique_ids(figure.svg, f"f{number}-"), number)))
               for number, figure in enumerate(report.figures, start=1)]
    return environment.get_template("report.html").render(report=report, figures=figures)


def build_report(session: Session, challenge_id: str, phase_slug: str, *,
                 resamples: int = DEFAULT_RESAMPLES) -> str:
    """The phase's report as one HTML document (a string)."""
    return render(gather(session, challenge_id, phase_slug, resamples=resamples))
