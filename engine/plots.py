"""The report's figures (challengeR's, mostly): data in, one SVG string out.

No database here: the caller gathers the values (engine/challenge_report.py).
Every figure is drawn on its own matplotlib Figure with the SVG canvas (no
pyplot, no display, no global state), with a fixed hash salt and no date in the
metadata: the same data gives the same bytes. Team names are participant text:
they are drawn with mathtext parsing off (a `$...$` name stays literal, it is
never parsed) and with control characters shown as escapes, and matplotlib
escapes them as XML text, so a name cannot open an element in the SVG.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from engine.scoring.ranking import rank_values

# same bytes for the same data: fixed ids, no date, text as <text> (searchable in the paper)
_STYLE = {"svg.hashsalt": "epreuve", "svg.fonttype": "none", "text.parse_math": False,
          "text.usetex": False, "font.size": 9, "axes.spines.top": False,
          "axes.spines.right": False}
# no date, and no RDF block (its namespace and type URLs are not needed offline)
_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
# characters that XML 1.0 cannot hold, and invisible marks that would let names look alike
_NOT_DRAWABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e"
                           r"\u2066-\u2069\ufffe\uffff]")
_COLOURS = matplotlib.colormaps["tab10"].colors


def label(text: object) -> str:
    """Participant text as a figure shows it: each control or invisible character escaped."""
    return _NOT_DRAWABLE.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                        else f"\\u{ord(m.group()):04x}"), str(text))


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(figure)
    return figure


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata=_METADATA)
    text = buffer.getvalue()
    # the XML prologue and DOCTYPE do not belong inside an HTML page
    return text[text.index("<svg"):]


def _drawn(draw):
    """Run `draw` under the fixed style: the rc settings apply to the texts it creates."""
    def wrapper(*args, **kwargs) -> str:
        with matplotlib.rc_context(_STYLE):
            return _svg(draw(*args, **kwargs))
    wrapper.__doc__, wrapper.__name__ = draw.__doc__, draw.__name__
    return wrapper


def _label_inches(names) -> float:
    """Room for the longest name at the figure's font size (a name is at most 100
    characters: the figure grows rather than its axes collapsing)."""
    return 0.075 * max((len(label(n)) for n in names), default=0)


def _colour(index: int):
    return _COLOURS[index % len(_COLOURS)]


def per_case_ranks(values: Mapping[str, Sequence[float]],
                   larger_is_better: bool) -> list[dict[str, int]]:
    """Each case's ranking of the teams (ties at their minimum)."""
    n_cases = len(next(iter(values.values()), []))
    return [rank_values({team: float(v[case]) for team, v in values.items()}, larger_is_better)
            for case in range(n_cases)]


def rank_shares(values: Mapping[str, Sequence[float]],
                larger_is_better: bool) -> dict[str, dict[int, float]]:
    """team -> rank -> share of the cases where the team had that rank."""
    rankings = per_case_ranks(values, larger_is_better)
    shares: dict[str, dict[int, float]] = {team: {} for team in values}
    for ranks in rankings:
        for team, rank in ranks.items():
            shares[team][rank] = shares[team].get(rank, 0.0) + 1.0 / len(rankings)
    return shares


@_drawn
def metric_distributions(values: Mapping[str, Sequence[float]], metric: str) -> Figure:
    """One metric's per-case values for each team: a box plot with every case as a dot
    (failed cases at their worst value, as everywhere)."""
    teams = list(values)
    figure = _figure(5.5 + _label_inches(teams), 0.9 + 0.38 * len(teams))
    axes = figure.add_subplot()
    data = [np.asarray(values[t], dtype=float) for t in teams]
    positions = np.arange(len(teams))[::-1]  # the first team on top
    axes.boxplot(data, positions=positions, orientation="horizontal", widths=0.6,
                 showfliers=False, medianprops={"color": "black"})
    jitter = np.random.default_rng(0)  # seeded: the same dots every time
    for index, (position, points) in enumerate(zip(positions, data, strict=True)):
        offsets = jitter.uniform(-0.18, 0.18, size=len(points))
        axes.scatter(points, position + offsets, s=12, alpha=0.7, color=_colour(index),
                     zorder=3, linewidths=0)
    axes.set_yticks(positions, [label(t) for t in teams])
    axes.set_xlabel(label(metric))
    axes.set_title(label(f"{metric}: per-case values (failed cases at their worst value)"))
    return figure


@_drawn
def rank_stability(rank_frequencies: Mapping[str, Mapping[int, float]],
                   full_ranks: Mapping[str, int], resamples: int) -> Figure:
    """challengeR's blob plot, turned on its side so that long names stay level: for each
    team, how often it took each rank over the bootstrap samples (the area of a circle), its
    median rank (a black cross) and the ranks of 95% of the samples (a black line). Teams in
    the order of the full ranking, the first on top."""
    teams = sorted(rank_frequencies, key=lambda t: (full_ranks.get(t, 0), t))
    n_ranks = max(len(teams), max((max(f, default=1) for f in rank_frequencies.values()),
                                  default=1))
    figure = _figure(2.5 + 0.45 * n_ranks + _label_inches(teams), 1.4 + 0.45 * len(teams))
    axes = figure.add_subplot()
    for index, team in enumerate(teams):
        frequencies = rank_frequencies[team]
        ranks = np.array(sorted(frequencies), dtype=float)
        shares = np.array([frequencies[r] for r in sorted(frequencies)], dtype=float)
        axes.scatter(ranks, np.full(len(ranks), index), s=400 * shares, color=_colour(index),
                     alpha=0.75, linewidths=0)
        cumulative = np.cumsum(shares)
        low, median, high = (ranks[min(np.searchsorted(cumulative, q - 1e-9),
                                       len(ranks) - 1)] for q in (0.025, 0.5, 0.975))
        axes.hlines(index, low, high, color="black", linewidth=1)
        axes.scatter([median], [index], marker="x", color="black", s=40, zorder=4)
    axes.set_yticks(range(len(teams)), [label(t) for t in teams])
    axes.set_xticks(range(1, n_ranks + 1), [f"#{r}" for r in range(1, n_ranks + 1)])
    axes.set_xlim(0.4, n_ranks + 0.6)
    axes.set_ylim(len(teams) - 0.4, -0.6)  # the first team on top
    axes.set_xlabel("rank")
    axes.set_title(f"Ranking stability ({resamples} bootstrap samples)")
    return figure


@_drawn
def podium(values: Mapping[str, Sequence[float]], metric: str,
           larger_is_better: bool) -> Figure:
    """challengeR's podium plot: each case ranks the teams; a team's value on that case is a
    dot in the column of its rank there (each team at its own offset in the column), and a
    case's dots are joined by a grey line."""
    teams = list(values)
    rankings = per_case_ranks(values, larger_is_better)
    figure = _figure(2.5 + 1.0 * len(teams) + _label_inches(teams), 4.2)
    axes = figure.add_subplot()
    width = 0.8 / max(len(teams), 1)
    offset = {t: -0.4 + width * (i + 0.5) for i, t in enumerate(teams)}
    for case, ranks in enumerate(rankings):
        points = sorted((ranks[t] + offset[t], float(values[t][case])) for t in teams)
        axes.plot([x for x, _ in points], [y for _, y in points], color="0.75", linewidth=0.6,
                  zorder=1)
    for index, team in enumerate(teams):
        xs = [ranks[team] + offset[team] for ranks in rankings]
        ys = [float(v) for v in values[team]]
        axes.scatter(xs, ys, s=16, color=_colour(index), label=label(team), zorder=3,
                     linewidths=0)
    axes.set_xticks(range(1, len(teams) + 1), [f"#{r}" for r in range(1, len(teams) + 1)])
    axes.set_xlim(0.5, len(teams) + 0.5)
    axes.set_xlabel("rank on the case (podium place)")
    axes.set_ylabel(label(metric))
    axes.set_title(label(f"Podium: {metric} per case"))
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


@_drawn
def ranking_heatmap(shares: Mapping[str, Mapping[int, float]], title: str) -> Figure:
    """Team x rank; each cell the share of cases (or of bootstrap samples) at that rank."""
    teams = list(shares)
    n_ranks = max(len(teams), max((max(s, default=1) for s in shares.values()), default=1))
    grid = np.array([[shares[t].get(r, 0.0) for r in range(1, n_ranks + 1)] for t in teams])
    figure = _figure(3.0 + 0.5 * n_ranks + _label_inches(teams), 1.4 + 0.4 * len(teams))
    axes = figure.add_subplot()
    # vector cells (pcolormesh, not imshow): no embedded raster, sharp in print
    axes.pcolormesh(np.arange(n_ranks + 1) - 0.5, np.arange(len(teams) + 1) - 0.5,
                            grid, cmap="Blues", vmin=0.0, vmax=1.0, edgecolors="white",
                            linewidth=0.5)
    axes.invert_yaxis()  # the first team on top
    for (row, column), share in np.ndenumerate(grid):
        if share > 0:
            axes.text(column, row, f"{share:.0%}", ha="center", va="center", fontsize=7,
                      color="white" if share > 0.6 else "black")
    axes.set_xticks(range(n_ranks), [f"#{r}" for r in range(1, n_ranks + 1)])
    axes.set_yticks(range(len(teams)), [label(t) for t in teams])
    axes.set_xlabel("rank")
    axes.set_title(label(title))  # no colour bar: matplotlib rasterises it; the cells say it
    return figure


@_drawn
def runtime_and_energy(runtime_seconds: Mapping[str, float | None],
                       energy_joules: Mapping[str, float | None]) -> Figure:
    """Mean runtime per case and GPU energy per submission, side by side; a team without a
    reading (no GPU, no NVML) is marked n/a rather than drawn as zero."""
    teams = list(runtime_seconds)
    figure = _figure(7.5 + _label_inches(teams), 1.0 + 0.38 * len(teams))
    positions = np.arange(len(teams))[::-1]
    panels = ((runtime_seconds, "runtime per case (s)"), (energy_joules, "GPU energy (J)"))
    for column, (readings, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, column)
        widths = [readings.get(t) or 0.0 for t in teams]
        axes.barh(positions, widths, color=[_colour(i) for i in range(len(teams))])
        top = max(widths, default=0.0) or 1.0
        for position, team in zip(positions, teams, strict=True):
            reading = readings.get(team)
            axes.text((reading or 0.0) + 0.01 * top, position,
                      "n/a" if reading is None else f"{reading:.3g}", va="center", fontsize=7)
        axes.set_xlim(0, top * 1.2)
        axes.set_yticks(positions, [label(t) for t in teams] if column == 1 else [])
        axes.set_title(title)
    return figure
