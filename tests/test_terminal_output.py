"""What the terminal shows, piped: the real `epreuve` process writing into a pipe prints every
team name, metric name and value whole (no 80-column cut, no ellipsis), in each of
`--format table|tsv|markdown|json`; text a participant chose stays inert in every format;
per-case results appear where the viewer may see them; and no help text breaks a sentence."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.datasets import load
from engine.db.models import CaseResultRow, ImageRow, JobRow, PhaseRow, SubmissionRow, TeamRow
from engine.rendering import Listing, Log, Note, markdown, tsv, tsv_field
from engine.results import compute_aggregates
from tests.conftest import REPO
from tests.engine_fixtures import registered_scene

EPREUVE = str(Path(sys.executable).parent / "epreuve")

CHALLENGE = """\
id: a-challenge-with-a-rather-long-identifier
title: Long names everywhere
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3, 12]}
metrics: {labels: [12], lesion_wise: true}
ranking: {metrics: [{metric: lesion_hd95, label: 12}, {metric: dice, label: 12}]}
phases:
  - id: open-validation-phase
    dataset: {path: data}
    limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}
    visibility: {logs: true, per_case: true}
  - id: hidden-phase
    dataset: {path: data}
    limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}
    visibility: {logs: false, per_case: false}
"""
OPEN, HIDDEN = "open-validation-phase", "hidden-phase"
# two teams that differ only past the 60th character: cut anywhere, they look the same
PREFIX = "Deep Segmentation Consortium of the Northern University Hospitals"
TEAMS = (f"{PREFIX}: monai baseline with test-time augmentation",
         f"{PREFIX}: monai baseline without test-time augmentation")
HOSTILE = "tab\there|pipe\nnew line \x1b[31mred [bold]*em*_x_ <b>`code`"


def evaluated(sessions, phase_slug: str, team: str, offset: float, seed: int) -> int:
    """A succeeded submission whose cases were scored (rows as the worker writes them)."""
    with sessions() as session:
        phase = session.scalar(select(PhaseRow).where(PhaseRow.slug == phase_slug))
        image = ImageRow(image_id=f"sha256:{seed:064x}", layers=[], reference="x",
                         architecture="amd64", user="1000", size_bytes=1)
        owner = session.scalar(select(TeamRow).where(TeamRow.name == team)) or TeamRow(name=team)
        session.add_all([image, owner])
        session.flush()
        submission = SubmissionRow(phase_id=phase.id, team_id=owner.id, image_pk=image.id,
                                   status="succeeded", message="evaluated")
        session.add(submission)
        session.flush()
        case_ids = load(Path(phase.dataset_path)).case_ids
        job = JobRow(submission_id=submission.id, kind="main", case_ids=case_ids,
                     status="succeeded", run_result={})
        session.add(job)
        session.flush()
        for index, case_id in enumerate(case_ids):
            session.add(CaseResultRow(
                submission_id=submission.id, job_id=job.id, case_id=case_id, valid=True,
                metrics={"dice[12]": 0.812345678 + offset + index / 1000,
                         "lesion_hd95[12]": 12.3456789 - offset * 10 + index,
                         "lesion_dice[12]": 0.7654321 + offset},
                runtime_seconds=1.25 + index, runtime_exact=True, output_sha256={}))
        session.flush()
        compute_aggregates(session, submission)
        session.commit()
        return submission.id


@pytest.fixture
def scene(tmp_path, monkeypatch):
    _, _, sessions = registered_scene(tmp_path, monkeypatch, CHALLENGE, cases=3, size=16)
    ids = [evaluated(sessions, OPEN, team, offset, seed)
           for seed, (team, offset) in enumerate(zip(TEAMS, (0.01, 0.0), strict=True), 1)]
    ids.append(evaluated(sessions, OPEN, HOSTILE, -0.1, 3))
    ids.append(evaluated(sessions, HIDDEN, TEAMS[0], 0.0, 4))
    return ids


def piped(*args: str, code: int = 0) -> str:
    """The real command writing into a pipe, in a narrow terminal's environment."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([EPREUVE, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout


def run(*args: str, code: int = 0) -> str:
    """The same command in this process (its output captured, so not a terminal either):
    for the many views whose width the piped tests have already shown."""
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (args, result.output)
    return result.stdout


def test_the_leaderboard_is_whole_when_piped(scene):
    board = json.loads(run("leaderboard", "a-challenge-with-a-rather-long-identifier", OPEN,
                           "--json"))
    shown = piped("leaderboard", "a-challenge-with-a-rather-long-identifier", OPEN)
    assert "…" not in shown
    assert max(len(line) for line in shown.splitlines()) > 80  # not folded into 80 columns
    for team in TEAMS:
        assert team in shown
    assert "lesion_hd95[12]" in shown and "dice[12]" in shown
    # inert, and on one line: a tab or line break in a name is shown as its escape
    assert "tab\\there|pipe\\nnew line \\x1b[31mred [bold]*em*_x_ <b>`code`" in shown
    assert "\x1b" not in shown
    for entry in board["entries"]:
        row = next(line for line in shown.splitlines() if f" {entry['submission_id']} " in line
                   and f" {entry['rank']} " in line)
        for key, value in entry["scores"].items():
            assert f"{value:.4f} (#{entry['metric_ranks'][key]})" in row


def test_each_format_shows_the_same_leaderboard(scene):
    args = ("leaderboard", "a-challenge-with-a-rather-long-identifier", OPEN)
    board = json.loads(run(*args, "--json"))
    assert json.loads(run(*args, "--format", "json")) == board

    rows = [line.split("\t") for line in run(*args, "--format", "tsv").splitlines()
            if line and not line.startswith("#")]
    header, body = rows[0], rows[1:]
    assert header[:5] == ["rank", "team", "submission", "lesion_hd95[12]", "dice[12]"]
    assert len(body) == len(board["entries"]) and {len(r) for r in body} == {len(header)}
    assert [r[1] for r in body] == [tsv_field(e["team"]) for e in board["entries"]]
    assert tsv_field(HOSTILE) == ("tab\\there|pipe\\nnew line \\\\x1b[31mred [bold]*em*_x_ "
                                  "<b>`code`")

    table = [line for line in run(*args, "--format", "markdown").splitlines()
             if line.startswith("|")]
    assert len(table) == 2 + len(board["entries"])
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table]  # unescaped pipes only
    assert {len(row) for row in cells} == {len(header)}
    hostile = next(row[1].strip() for row in cells[2:] if "pipe" in row[1])
    assert hostile == ("tab\there\\|pipe<br>new line \\\\x1b\\[31mred \\[bold\\]\\*em\\*\\_x\\_ "
                       "\\<b\\>\\`code\\`")
    for team in TEAMS:
        assert team in "\n".join(table)


def test_status_shows_per_case_results_where_the_viewer_may_see_them(scene):
    first, _, _, hidden = scene
    data = json.loads(run("status", str(first), "--participant", "--json"))
    for view in (piped("status", str(first)), piped("status", str(first), "--participant")):
        assert "per-case results" in view and "…" not in view
        for case in data["cases"]:
            row = next(line for line in view.splitlines() if case["case_id"] in line)
            for value in case["metrics"].values():
                assert f"{value:.4f}" in row
    tsv_view = run("status", str(first), "--participant", "--format", "tsv")
    assert "case\tresult\tdice[12]\tlesion_hd95[12]\tlesion_dice[12]\truntime" in tsv_view

    organiser = json.loads(run("status", str(hidden), "--json"))
    assert organiser["cases"]  # the organiser sees them in a hidden phase...
    shown = piped("status", str(hidden))
    assert all(c["case_id"] in shown for c in organiser["cases"])
    for fmt in ("table", "tsv", "markdown", "json"):  # ... the participant never does
        view = run("status", str(hidden), "--participant", "--format", fmt)
        assert "per-case results" not in view
        assert fmt != "json" or "cases" not in json.loads(view)
        assert not any(c["case_id"] in view for c in organiser["cases"])


def test_the_queue_and_a_verification_in_each_format(scene, tmp_path):
    assert json.loads(run("status", "--format", "json")) == json.loads(run("status",
                                                                             "--json"))
    assert run("status", "--format", "tsv").splitlines()[:3] == ["# queue", "state\tjobs",
                                                                   "succeeded\t4"]
    target = tmp_path / "data/ground_truth/case-002/label.nii.gz"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-1])
    changed = run("dataset", "verify", str(tmp_path / "data"), "--format", "tsv", code=1)
    assert "change\tpath\nchanged\tground_truth/case-002/label.nii.gz\n" in changed
    assert json.loads(run("dataset", "verify", str(tmp_path / "data"), "--format", "json",
                            code=1))["changed"] == ["ground_truth/case-002/label.nii.gz"]


def test_tsv_and_markdown_keep_participant_text_inert_and_in_its_cell():
    blocks = [Note(f"message: {HOSTILE}"), Log("log (tail):", "```\nfine\n````x\x07"),
              Listing("t|itle", ("team", "score"), [(HOSTILE, "1.0")])]
    as_tsv = tsv(blocks)
    assert "\x1b" not in as_tsv and "\x07" not in as_tsv
    lines = as_tsv.splitlines()
    assert all(line.startswith("#") or line.count("\t") == 1 for line in lines if line)
    as_markdown = markdown(blocks)
    assert "\x1b" not in as_markdown and "\\x07" in as_markdown
    assert "\n`````text\n```\nfine\n````x\\x07\n`````" in as_markdown  # the log can't close it
    assert "### t\\|itle" in as_markdown


# -- help texts ----------------------------------------------------------------------------

def _commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def _sentences(text: str) -> list[str]:
    return [" ".join(paragraph.split()) for paragraph in text.split("\n\n") if paragraph.strip()]


def test_every_help_text_prints_its_sentences_unbroken():
    """Each command's help, its options' help and its subcommands' summaries appear as whole
    lines in the rendered --help (wide enough not to wrap): a source line break is no break."""
    import typer
    from typer.testing import CliRunner

    from engine.cli import app

    root = typer.main.get_command(app)
    walked = list(_commands(root))
    assert len(walked) > 15  # every command and subcommand
    for path, command in walked:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "2000"})
        assert result.exit_code == 0, (path, result.output)
        lines = [re.sub(r"\s+", " ", line.strip("│ ")) for line in result.output.splitlines()]
        texts = _sentences(command.help or "")
        texts += [s for param in command.params for s in _sentences(getattr(param, "help", "")
                                                                    or "")]
        texts += [_sentences(sub.help or "")[0] for sub in getattr(command, "commands",
                                                                   {}).values()]
        for text in texts:
            assert any(text in line for line in lines), (path, text, result.output)


def _implicit_concatenations(source: str):
    """Adjacent string literals (implicit concatenation) whose seam has no space:
    ("... the" "image") reads "theimage"."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
    for left, right in itertools.pairwise(tokens):
        if left.type == right.type == tokenize.STRING:
            end = left.string.rstrip("'\"")[-1:]
            start = re.sub(r"^[rbfuRBFU]*['\"]+", "", right.string)[:1]
            if end.isalnum() and start.isalnum():
                yield left.start[0], left.string[-20:] + " " + right.string[:20]


def test_no_help_string_is_glued_to_the_next():
    for path in [REPO / "engine/cli.py"]:
        glued = list(_implicit_concatenations(path.read_text()))
        assert glued == [], glued
    assert list(_implicit_concatenations('x = ("the" "image")\ny = ("the " "image")\n')) == [
        (1, '"the" "image"')]


def test_score_in_each_format(tmp_path):
    import numpy as np

    from engine.medio import Volume, write_nifti

    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    write_nifti(Volume(reference, np.eye(4)), tmp_path / "reference.nii.gz")
    write_nifti(Volume(np.roll(reference, 1, axis=0), np.eye(4)), tmp_path / "prediction.nii.gz")
    args = ("score", str(tmp_path / "prediction.nii.gz"), str(tmp_path / "reference.nii.gz"))
    scores = json.loads(run(*args, "--json"))["1"]
    assert json.loads(run(*args, "--format", "json")) == {"1": scores}
    lines = run(*args, "--format", "tsv").splitlines()
    assert lines[:2] == ["# prediction.nii.gz vs reference.nii.gz (spacing 1, 1, 1 mm)",
                         "metric\tlabel 1"]
    assert lines[2:] == [f"{metric}\t{value:.4f}" for metric, value in scores.items()]
    shown = piped(*args)
    assert all(f"{value:.4f}" in shown for value in scores.values())
