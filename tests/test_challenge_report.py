"""`epreuve report`: the self-contained HTML report and the figures of engine/plots.py.

The submissions are finished the way the worker finishes them, without containers:
each team's predictions are the sealed ground truth with a share of its voxels
erased (seeded), scored by the real scorer, stored as case results, and aggregated
by engine/results.py. Two teams carry hostile names (markup, mathtext).
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from engine import plots
from engine.challenge_report import build_report, energy_joules, unique_ids
from engine.datasets import load
from engine.db.models import (
    AggregateRow,
    ImageRow,
    JobRow,
    PhaseRow,
    SubmissionRow,
    utcnow,
)
from engine.evaluation import flatten, worst_metrics
from engine.leaderboard import leaderboard
from engine.medio import read_volume
from engine.results import compute_aggregates
from engine.scoring.segmentation import SegmentationSettings, score_segmentation
from engine.statuses import JobKind, JobStatus, SubmissionStatus
from engine.submissions import challenge_definition, find_phase, get_or_create_team
from tests.conftest import postgres_sessions
from tests.engine_fixtures import make_scene

SCRIPT_TEAM = "</text><script>alert(1)</script>"
MATH_TEAM = "$\\frac{1}{0}$"
ENTITY_TEAM = 'id="x" &amp; <b>bold</b> https://evil.example/x.png'
LONG_TEAM = ("a-team-whose-name-takes-all-the-room-" * 3)[:100]  # MAX_TEAM_NAME
# team -> (share of label voxels erased, failed cases, GPU energy per job or None)
TEAMS = {
    "alpha": (0.05, 0, 120.0),
    "beta": (0.25, 0, 80.0),
    SCRIPT_TEAM: (0.5, 1, None),
    MATH_TEAM: (0.15, 2, 40.5),
    ENTITY_TEAM: (0.35, 0, None),
    LONG_TEAM: (0.3, 0, 10.0),
}
# a figure whose axes collapse (a long name, many teams) warns: here, it fails
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


def _prediction(reference: np.ndarray, erased: float, rng: np.random.Generator) -> np.ndarray:
    prediction = reference.copy()
    prediction[(reference > 0) & (rng.random(reference.shape) < erased)] = 0
    return prediction


def finish_submission(session, phase_row: PhaseRow, team_name: str, erased: float,
                      n_failed: int, energy: float | None, seed: int) -> SubmissionRow:
    """A submission as the worker leaves it: one job per case, case results, aggregates."""
    from engine.db.models import CaseResultRow

    challenge = challenge_definition(phase_row.challenge)
    dataset = load(phase_row.dataset_path)
    settings = SegmentationSettings(labels=tuple(challenge.metrics.labels),
                                    nsd_tolerance_mm=challenge.metrics.nsd_tolerance_mm,
                                    surface=challenge.metrics.surface,
                                    empty=challenge.metrics.empty_policy())
    digest = hashlib.sha256(f"{phase_row.slug}/{team_name}".encode()).hexdigest()
    image = ImageRow(image_id=f"sha256:{digest}", tar_sha256=digest, layers=[],
                     reference=f"team/{seed}:latest", architecture="amd64", user="1000",
                     size_bytes=1 << 20)
    submission = SubmissionRow(phase=phase_row, team=get_or_create_team(session, team_name),
                               image=image, status=SubmissionStatus.SUCCEEDED.value,
                               finished_at=utcnow())
    session.add(submission)
    session.flush()
    rng = np.random.default_rng(seed)
    for index, case_id in enumerate(dataset.case_ids):
        gpus = {} if energy is None else {f"GPU-{seed}": {"uuid": f"GPU-{seed}",
                                                          "energy_joules": energy}}
        job = JobRow(submission=submission, kind=(JobKind.SMOKE if index == 0 else
                                                   JobKind.MAIN).value,
                     case_ids=[case_id], status=JobStatus.SUCCEEDED.value, attempts=1,
                     run_result={"wall_seconds": 1.0 + seed + index, "gpus": gpus},
                     finished_at=utcnow())
        session.add(job)
        session.flush()
        failed = index >= len(dataset.case_ids) - n_failed
        if failed:
            metrics = worst_metrics(challenge, dataset, case_id)
        else:
            reference = read_volume(dataset.ground_truth_path(case_id))
            truth = np.asarray(reference.array)
            metrics = flatten(score_segmentation(_prediction(truth, erased, rng), truth,
                                                 reference.spacing, settings))
        session.add(CaseResultRow(
            submission_id=submission.id, job_id=job.id, case_id=case_id, valid=not failed,
            reason="OUTPUT_MISSING" if failed else None, message=None if not failed else
            f"/output/{case_id}/mask.nii.gz was not written", metrics=metrics,
            runtime_seconds=1.0 + seed + index, runtime_exact=True, output_sha256={}))
    session.flush()
    compute_aggregates(session, submission)
    session.flush()
    return submission


RESAMPLES = 50


def finished_scene(root: Path, teams: dict, database_url: str | None = None):
    """The challenge registered, and every team's submission finished in its validation and
    final phases."""
    from engine.submissions import register_challenge

    scene = make_scene(root, challenge_id="report-liver", validation_cases=5,
                       database_url=database_url)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        for phase in ("validation", "final"):
            phase_row, _ = find_phase(session, "report-liver", phase)
            for seed, (team, (erased, n_failed, energy)) in enumerate(teams.items(), 1):
                finish_submission(session, phase_row, team, erased, n_failed, energy, seed)
        session.commit()
    return scene


@pytest.fixture(scope="module")
def scene(module_tmp):
    return finished_scene(module_tmp("report"), TEAMS)


@pytest.fixture(scope="module")
def report(scene) -> str:
    with scene.sessions() as session:
        return build_report(session, "report-liver", "validation", resamples=RESAMPLES)


class _Page(HTMLParser):
    """Every tag and attribute of a page, the text of each table cell."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.cells: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.cells.append([])
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def offline_sanity(html: str) -> _Page:
    """What the brief asks of the file: it parses, runs nothing, fetches nothing, and every
    inline SVG is well-formed XML."""
    page = _Page()
    page.feed(html)
    page.close()
    assert "<script" not in html.lower()
    for tag, attributes in page.tags:
        assert tag not in {"script", "iframe", "object", "embed", "link", "img", "foreignobject"}
        for name, value in attributes.items():
            assert not name.startswith("on"), (tag, name)
            if name.startswith("xmlns"):
                continue  # a namespace name, never fetched
            assert not re.search(r"(?i)(https?:|ftp:|url\((?!#))", value or ""), (tag, name)
            if name in {"href", "src", "xlink:href", "action", "srcset"}:
                assert (value or "").startswith("#"), (tag, name, value)
    assert not re.search(r"(?i)url\(\s*['\"]?(?!#)", html), "a CSS url() to a resource"
    assert not re.search(r"(?i)@import", html)
    svgs = re.findall(r"<svg\b.*?</svg>", html, flags=re.S)
    for svg in svgs:
        ET.fromstring(svg)
    ids = re.findall(r'<[^<>]*\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "ids unique within the page"
    return page


def leaderboard_rows(page: _Page) -> list[list[str]]:
    return [row for row in page.cells if row]


def test_the_report_is_one_offline_html_file(report):
    page = offline_sanity(report)
    assert report.startswith("<!DOCTYPE html>")
    assert "Organiser report: it holds per-case results." in report
    assert "Test challenge" in report and "validation" in report
    # the figures: per metric a distribution, a podium and a heatmap; bootstrap blob and
    # heatmap; runtime and energy
    assert report.count("<svg") == 2 * 3 + 2 + 1
    assert len([t for t, _ in page.tags if t == "figure"]) == 9
    # each figure is announced by its caption
    labelled = [a["aria-labelledby"] for t, a in page.tags if t == "svg"]
    captions = {a["id"] for t, a in page.tags if t == "figcaption"}
    assert len(labelled) == 9 and set(labelled) == captions


def check_the_table(sessions, html: str, teams: dict) -> dict[str, list[str]]:
    """Each team once, whole, in the leaderboard's order, with the stored aggregates'
    numbers: the rank, each ranking metric's mean and 95% interval, failed cases, runtime
    and energy."""
    rows = leaderboard_rows(offline_sanity(html))
    assert sorted(row[1] for row in rows) == sorted(teams)
    with sessions() as session:
        entries = leaderboard(session, "report-liver", "validation")
        assert [row[1] for row in rows] == [e.team for e in entries]
        for row, entry in zip(rows, entries, strict=True):
            summaries = {a.metric: a.summary for a in session.scalars(select(AggregateRow).where(
                AggregateRow.submission_id == entry.submission_id))}
            assert row[0] == str(entry.rank) and row[2] == str(entry.submission_id)
            for column, key in enumerate(("dice[1]", "hd95[1]"), start=3):
                summary = summaries[key]
                # the leaderboard's aggregate is the mean of the stored per-case values
                assert row[column] == (f"{summary['mean']:.4f} (#{entry.metric_ranks[key]}) "
                                       f"[{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]")
            assert row[5] == f"{summaries['dice[1]']['n_failed']} / {summaries['dice[1]']['n']}"
            assert row[6] == f"{summaries['runtime_seconds']['mean']:.2f}"
            submission = session.get(SubmissionRow, entry.submission_id)
            energy = energy_joules(submission.jobs)
            assert row[7] == ("n/a" if energy is None else f"{energy:.1f}")
    return {row[1]: row for row in rows}


def test_each_team_appears_once_whole_with_the_aggregates(scene, report):
    by_team = check_the_table(scene.sessions, report, TEAMS)
    assert by_team[MATH_TEAM][5] == "2 / 5" and by_team[SCRIPT_TEAM][5] == "1 / 5"
    assert by_team["alpha"][7] == f"{120.0 * 5:.1f}"  # one job per case, each 120 J
    assert by_team[SCRIPT_TEAM][7] == "n/a"  # no GPU reading is no reading, not zero
    assert by_team[LONG_TEAM][1] == LONG_TEAM and len(LONG_TEAM) == 100


def test_the_report_on_postgresql(tmp_path):
    postgres_sessions()  # a clean schema, or a skip without a server
    import os

    teams = {name: TEAMS[name] for name in ("alpha", "beta", SCRIPT_TEAM)}
    scene = finished_scene(tmp_path, teams, os.environ["EPREUVE_TEST_POSTGRES_URL"])
    with scene.sessions() as session:
        html = build_report(session, "report-liver", "validation", resamples=20)
    check_the_table(scene.sessions, html, teams)
    assert html.count("<svg") == 2 * 3 + 2 + 1


def test_hostile_team_names_are_inert(report):
    offline_sanity(report)
    assert "<script>alert(1)</script>" not in report
    assert "&lt;/text&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "<b>bold</b>" not in report
    svgs = re.findall(r"<svg\b.*?</svg>", report, flags=re.S)
    texts = ["".join(element.itertext()) for svg in svgs
             for element in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    # drawn literally: the mathtext name is not parsed into a fraction, the markup stays text
    assert MATH_TEAM in texts and SCRIPT_TEAM in texts and ENTITY_TEAM in texts
    for svg in svgs:
        root = ET.fromstring(svg)
        assert not [e for e in root.iter() if e.tag.rsplit("}", 1)[-1] in {"script",
                                                                           "foreignObject"}]


def test_the_report_names_no_case_and_no_log(scene, report):
    with scene.sessions() as session:
        phase_row, _ = find_phase(session, "report-liver", "validation")
        case_ids = list(load(phase_row.dataset_path).case_ids)
    for case_id in case_ids:
        assert case_id not in report
    assert "was not written" not in report


def test_a_hidden_phase_says_so_at_the_top(scene):
    with scene.sessions() as session:
        html = build_report(session, "report-liver", "final", resamples=20)
    offline_sanity(html)
    notice = html[:html.index("</p>", html.index('id="per-case-notice"'))]
    assert "never see per-case results" in notice
    with scene.sessions() as session:
        phase_row, _ = find_phase(session, "report-liver", "final")
        for case_id in load(phase_row.dataset_path).case_ids:
            assert case_id not in html


def test_same_data_same_bytes(scene, report):
    with scene.sessions() as session:
        again = build_report(session, "report-liver", "validation", resamples=RESAMPLES)
    assert again == report
    values = {"a": [0.9, 0.7, 0.8], MATH_TEAM: [0.5, 0.6, 0.4]}
    for draw in (lambda: plots.metric_distributions(values, "dice[1]"),
                 lambda: plots.podium(values, "dice[1]", True),
                 lambda: plots.ranking_heatmap(plots.rank_shares(values, True), "t"),
                 lambda: plots.rank_stability({"a": {1: 0.7, 2: 0.3}, MATH_TEAM: {1: 0.3, 2: 0.7}},
                                              {"a": 1, MATH_TEAM: 2}, 10),
                 lambda: plots.runtime_and_energy({"a": 1.5, MATH_TEAM: None},
                                                  {"a": None, MATH_TEAM: 3.0})):
        first = draw()
        assert first == draw()
        assert first.startswith("<svg") and "<dc:date>" not in first and "http://purl" not in first
        ET.fromstring(first)


def test_control_characters_in_stored_names_are_shown_as_escapes():
    # team_name_problem refuses them for new teams; a figure must still be valid XML if an
    # older row or another path holds one
    svg = plots.metric_distributions({"bell\x07\x1b[31m": [0.1, 0.2]}, "dice[1]")
    ET.fromstring(svg)
    assert "bell\\x07\\x1b[31m" in svg


def test_rank_shares_follow_each_case():
    values = {"a": [0.9, 0.1, 0.5], "b": [0.8, 0.2, 0.5]}
    assert plots.per_case_ranks(values, True) == [{"a": 1, "b": 2}, {"a": 2, "b": 1},
                                                  {"a": 1, "b": 1}]
    shares = plots.rank_shares(values, True)
    assert shares["a"] == pytest.approx({1: 2 / 3, 2: 1 / 3})
    assert plots.rank_shares(values, False)["a"] == pytest.approx({2: 1 / 3, 1: 2 / 3})


def test_unique_ids_rewrite_tags_not_text():
    svg = '<svg><g id="a"><path clip-path="url(#p1)"/><use xlink:href="#m1"/>' \
          '<text>id="a" url(#p1)</text></g></svg>'
    assert unique_ids(svg, "f2-") == ('<svg><g id="f2-a"><path clip-path="url(#f2-p1)"/>'
                                      '<use xlink:href="#f2-m1"/><text>id="a" url(#p1)</text>'
                                      '</g></svg>')


def test_cli_writes_the_report(scene, tmp_path, monkeypatch):
    from engine.cli import app

    monkeypatch.setenv("EPREUVE_DATA_DIR", str(scene.settings.data_dir))
    monkeypatch.setenv("EPREUVE_DATABASE_URL", scene.settings.database_url)
    target = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", "report-liver", "validation", "--to",
                                      str(target), "--resamples", "20"])
    assert result.exit_code == 0, result.output
    html = target.read_text(encoding="utf-8")
    offline_sanity(html)
    assert "alpha" in html and "holds per-case results" in result.output
    unknown = CliRunner().invoke(app, ["report", "no-such", "validation", "--to",
                                       str(tmp_path / "x.html")])
    assert unknown.exit_code != 0 and "no challenge 'no-such'" in unknown.output
    assert "Traceback" not in unknown.output and not (tmp_path / "x.html").exists()
    unwritable = CliRunner().invoke(app, ["report", "report-liver", "validation", "--to",
                                          str(tmp_path / "missing" / "r.html"),
                                          "--resamples", "0"])
    assert unwritable.exit_code != 0 and "cannot write" in unwritable.output


def test_a_phase_without_submissions_still_reports(scene):
    with scene.sessions() as session:
        html = build_report(session, "report-liver", "closed")
    offline_sanity(html)
    assert "No evaluated submission yet." in html and "<svg" not in html


def test_template_is_packaged():
    assert (Path(__file__).parent.parent / "engine/templates/report.html").is_file()


CLASSIFICATION_CHALLENGE = """
id: tumour-presence
title: Is there a tumour?
task: classification
output: {kind: probabilities, filename: predictions.csv, classes: [probability]}
ranking: {metrics: [{metric: roc_auc}]}
phases:
  - id: test
    dataset: {path: data}
    cases_per_run: 3
    limits: {memory: 512m, time_per_case: 30s}
"""


def test_a_classification_phase_reports_its_table_and_runtime(tmp_path):
    """No per-case metric in a classification phase: the table and the runtime figure."""
    from engine.datasets import seal
    from engine.db import session_factory
    from engine.db.models import CaseResultRow
    from engine.submissions import register_challenge
    from engine.synthetic import synth_dataset

    synth_dataset(tmp_path / "data", cases=6, task="classification", seed=5, size=24)
    seal(tmp_path / "data")
    (tmp_path / "challenge.yaml").write_text(CLASSIFICATION_CHALLENGE)
    sessions = session_factory(f"sqlite:///{tmp_path / 'epreuve.db'}")
    teams = {"sure": 0.9, SCRIPT_TEAM: 0.6}
    with sessions() as session:
        register_challenge(session, tmp_path / "challenge.yaml")
        phase_row, _ = find_phase(session, "tumour-presence", "test")
        labels = load(phase_row.dataset_path).labels()
        for seed, (team, confidence) in enumerate(teams.items(), 1):
            submission = SubmissionRow(
                phase=phase_row, team=get_or_create_team(session, team),
                image=ImageRow(image_id=f"sha256:{seed:064x}", layers=[], reference="c",
                               architecture="amd64", user="1000", size_bytes=1),
                status=SubmissionStatus.SUCCEEDED.value, finished_at=utcnow())
            job = JobRow(submission=submission, kind=JobKind.MAIN.value,
                         case_ids=list(labels), status=JobStatus.SUCCEEDED.value,
                         run_result={"wall_seconds": 3.0, "gpus": {}})
            session.add(job)
            session.flush()
            for index, (case_id, label) in enumerate(labels.items()):
                right = index % 3 != 0 or seed == 1
                p = confidence if (label == "1") == right else 1 - confidence
                session.add(CaseResultRow(
                    submission_id=submission.id, job_id=job.id, case_id=case_id, valid=True,
                    metrics={"probabilities": {"probability": p}}, runtime_seconds=0.5 * seed,
                    runtime_exact=False, output_sha256={}))
            session.flush()
            compute_aggregates(session, submission)
        session.commit()
    with sessions() as session:
        html = build_report(session, "tumour-presence", "test")
        rows = leaderboard_rows(offline_sanity(html))
        entries = leaderboard(session, "tumour-presence", "test")
        assert [row[1] for row in rows] == [e.team for e in entries] and len(rows) == 2
        for row, entry in zip(rows, entries, strict=True):
            auc = session.scalar(select(AggregateRow).where(
                AggregateRow.submission_id == entry.submission_id,
                AggregateRow.metric == "roc_auc")).summary["value"]
            assert row[3] == f"{auc:.4f} (#{entry.metric_ranks['roc_auc']})"
    assert html.count("<svg") == 1 and "<script>alert" not in html


def test_energy_sums_every_gpu_of_every_run_and_skips_non_readings():
    jobs = [JobRow(run_result={"gpus": {"GPU-a": {"energy_joules": 10.5},
                                        "GPU-b": {"energy_joules": 2}}}),
            JobRow(run_result={"gpus": {"GPU-a": {"energy_joules": float("nan")},
                                        "GPU-c": {"energy_joules": True},
                                        "GPU-d": {"energy_joules": None}, "GPU-e": "x"}}),
            JobRow(run_result=None), JobRow(run_result={"gpus": None})]
    assert energy_joules(jobs) == 12.5
    assert energy_joules(jobs[1:]) is None


def test_same_bytes_across_processes():
    """No per-process salt (matplotlib's default is a fresh uuid4; Python's hash seed)."""
    import os
    import subprocess
    import sys

    script = ("from engine import plots; v = {'a': [0.9, 0.7], 'b': [0.5, 0.8]}; "
              "print(plots.podium(v, 'dice[1]', True) + plots.ranking_heatmap("
              "plots.rank_shares(v, True), 't'))")
    outputs = {subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1
