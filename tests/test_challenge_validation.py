"""A hostile (or careless) organiser's challenge file: every mistake is refused, whole,
through the real `epreuve challenge create`, with the field, its line, the value and what is
allowed; never a traceback, and nothing registered."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from engine.challenge_schema import markdown
from engine.challenges import ChallengeError, EmptyMasks, load_challenge
from engine.cli import app
from engine.datasets import seal
from engine.db import session_factory
from engine.db.models import ChallengeRow, EventRow, PhaseRow
from engine.scoring.conventions import EmptyMaskPolicy
from engine.synthetic import synth_dataset
from tests.conftest import REPO

GOOD = """\
id: c1
title: A challenge
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1]}
metrics:
  labels: [1]
  empty_masks: {both_empty_overlap: 1.0}
ranking:
  metrics: [{metric: dice, label: 1}]
phases:
  - id: p1
    dataset: {path: data}
    quota: {submissions: 3, per: 1d}
    limits: {memory: 1g, cpus: 1, time_per_case: 90s, output_quota: 64m, pids: 64}
    sample_cases: [case-002]
"""
LIMITS = "limits: {memory: 1g, cpus: 1, time_per_case: 90s, output_quota: 64m, pids: 64}"


def limits(**changes: str) -> tuple[str, str]:
    values = {"memory": "1g", "cpus": "1", "time_per_case": "90s", "output_quota": "64m",
              "pids": "64", **changes}
    return LIMITS, "limits: {" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}"


# (what to replace, field path, line, the gist of the message)
BAD = [
    (limits(time_per_case="0"), "phases[0].limits.time_per_case", 14,
     "0s is outside the allowed range 1s to 1d"),
    (limits(time_per_case=".nan"), "phases[0].limits.time_per_case", 14,
     "Input should be a finite number (got nan)"),
    (limits(time_per_case="1000000000d"), "phases[0].limits.time_per_case", 14,
     "1e+09d is outside the allowed range 1s to 1d"),
    (limits(time_per_case="soon"), "phases[0].limits.time_per_case", 14,
     "'soon' is not a duration"),
    (limits(cpus="0.000000001"), "phases[0].limits.cpus", 14,
     "1e-09 is outside the allowed range 0.01 to 256"),
    (limits(cpus=".inf"), "phases[0].limits.cpus", 14, "Input should be a finite number (got inf)"),
    (limits(memory="2t"), "phases[0].limits.memory", 14,
     "2t is outside the allowed range 16m to 1t"),
    (limits(memory="4 gigs"), "phases[0].limits.memory", 14, "'4 gigs' is not a size"),
    (limits(memory="[1]"), "phases[0].limits.memory", 14, "[1] is not a size"),
    (limits(output_quota="1.5"), "phases[0].limits.output_quota", 14,
     "1.5 is not a whole number of bytes"),
    (limits(gpus="true"), "phases[0].limits.gpus", 14, "true is not a number"),
    (limits(pids="4"), "phases[0].limits.pids", 14, "4 is outside the allowed range 16 to 65536"),
    (("quota: {submissions: 3, per: 1d}", "quota: {submissions: 3, per: -86400}"),
     "phases[0].quota.per", 13, "-86400s is outside the allowed range 1m to 366d"),
    (("quota: {submissions: 3, per: 1d}", "quota: {submissions: 0, per: 1d}"),
     "phases[0].quota.submissions", 13, "0 is outside the allowed range 1 to 1000"),
    (("labels: [0, 1]}", "labels: [0, 1], max_voxel_bytes: -1}"), "output.max_voxel_bytes", 4,
     "-1 is outside the allowed range 1 to 64g"),
    (("filename: mask.nii.gz", "filename: /etc/passwd"), "output.filename", 4,
     "'/etc/passwd' is not accepted: the output file name must be a plain name"),
    (("filename: mask.nii.gz", "filename: ../mask.nii.gz"), "output.filename", 4,
     "'../mask.nii.gz' is not accepted: the output file name must be a plain name"),
    (("filename: mask.nii.gz", "filename: mask.png"), "output.filename", 4,
     "'mask.png' is not accepted: the output file name must be a plain name (letters, "
     "digits, '.', '_', '-'; no folder) ending in .nii.gz, .nii, .mha"),
    (("filename: mask.nii.gz", "filname: mask.nii.gz"), "output.filname", 4,
     "unknown key 'filname'; known: kind, filename, labels, max_voxel_bytes"),
    (("metric: dice", "metric: dsc"), "ranking.metrics[0].metric", 9,
     "unknown metric 'dsc'; known: dice, iou, hd, hd95, assd, masd, nsd"),
    (("metric: dice", "metric: lesion_dice"), "ranking.metrics[0].metric", 9,
     "unknown metric 'lesion_dice'; known: dice, iou, hd, hd95, assd, masd, nsd, "
     "volume_difference_ml, abs_volume_difference_ml, sensitivity, precision, specificity; "
     "lesion-wise metrics need metrics.lesion_wise: true"),
    (("metric: dice", "metric: volume_difference_ml"), "ranking.metrics[0].metric", 9,
     "metric 'volume_difference_ml' has no ranking direction"),
    (("{metric: dice, label: 1}", "{metric: dice, label: 2}"), "ranking.metrics[0].label", 9,
     "label 2 is not scored: metrics.labels is [1]"),
    (("{metric: dice, label: 1}", "{metric: dice}"), "ranking.metrics[0].metric", 9,
     "'dice' needs a label: one of metrics.labels [1]"),
    (("  labels: [1]", "  labels: [1, 5]"), "metrics.labels", 6,
     "labels [5] are not in output.labels [0, 1]"),
    (("{both_empty_overlap: 1.0}", "{both_empty: .nan}"), "metrics.empty_masks.both_empty", 7,
     "unknown key 'both_empty'; known: both_empty_overlap, both_empty_nsd"),
    (("{both_empty_overlap: 1.0}", "{both_empty_overlap: .nan}"),
     "metrics.empty_masks.both_empty_overlap", 7,
     "Input should be a finite number (got nan)"),
    (("{both_empty_overlap: 1.0}", "{one_empty_distance: far}"),
     "metrics.empty_masks.one_empty_distance", 7,
     "'far' is neither a distance in mm nor 'diagonal'"),
    (("task: segmentation", "task: classification"), "output.kind", 4,
     "a classification challenge needs output.kind: probabilities"),
    (("    sample_cases: [case-002]", "    opens: 2026-02-01\n    closes: 2026-01-01"),
     "phases[0].closes", 16, "closes (2026-01-01 00:00 UTC) must be after opens"),
    (("    sample_cases: [case-002]", "    final: true\n    visibility: {logs: true}"),
     "phases[0].visibility", 16, "a final phase never shows logs"),
    (("  - id: p1\n", "  - id: p1\n    dataset: {path: other}\n"), None, 13,
     "key 'dataset' is given twice"),
    (("title: A challenge", "title: &t A challenge\nsubtitle: *t"), None, 2,
     "anchors and aliases (&, *) are not supported"),
    (("title: A challenge\n", ""), "title", 1, "required, but missing"),
    (("dataset: {path: data}", "dataset: {path: data, version: abc}"),
     "phases[0].dataset.version", 12, "String should match pattern"),
    (("dataset: {path: data}", "dataset: {path: missing}"), "phases[0].dataset.path", 12,
     "phase p1: ")
]


@pytest.fixture(scope="module")
def sealed(module_tmp):
    root = module_tmp("challenge")
    synth_dataset(root / "data", cases=2, seed=3, size=16)
    seal(root / "data")
    return root


@pytest.fixture
def cli(sealed, tmp_path, monkeypatch):
    monkeypatch.setenv("EPREUVE_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EPREUVE_DATABASE_URL", raising=False)
    runner = CliRunner()

    def create(text: str, *extra: str):
        (sealed / "challenge.yaml").write_text(text)
        return runner.invoke(app, ["challenge", "create", str(sealed / "challenge.yaml"),
                                   *extra])

    create.sessions = lambda: session_factory(f"sqlite:///{tmp_path / 'state' / 'epreuve.db'}")
    return create


def test_the_good_file_is_registered(cli):
    result = cli(GOOD)
    assert result.exit_code == 0, result.output
    assert "challenge c1: A challenge; phases: p1 (2 cases)" in result.output


@pytest.mark.parametrize(("change", "where", "line", "gist"), BAD,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD)])
def test_a_bad_file_names_field_line_and_value(cli, change, where, line, gist):
    assert change[0] in GOOD
    result = cli(GOOD.replace(*change))
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    expected = f"line {line}, {where}: {gist}" if where else f"line {line}: {gist}"
    assert expected in output, output
    with cli.sessions()() as session:  # nothing registered
        assert session.scalar(select(func.count()).select_from(ChallengeRow)) == 0


def test_every_error_of_a_file_at_once(cli):
    text = GOOD.replace("metric: dice", "metric: dsc").replace(*limits(cpus="0"))
    output = cli(text).output
    assert "line 14, phases[0].limits.cpus: 0 is outside the allowed range 0.01 to 256" in output
    # the ranking is only checked once the fields are: the first error is reported now,
    # the next when it is fixed
    output = cli(GOOD.replace("metric: dice", "metric: dsc").replace(
        "{both_empty_overlap: 1.0}", "{both_empty: 1}")).output
    assert "line 7, metrics.empty_masks.both_empty: unknown key 'both_empty'" in output


def test_no_traceback_from_the_real_command(sealed, tmp_path):
    (sealed / "nan.yaml").write_text(GOOD.replace("{both_empty_overlap: 1.0}",
                                                  "{both_empty: .nan}"))
    result = subprocess.run([sys.executable, "-m", "engine.cli", "challenge", "create",
                             str(sealed / "nan.yaml")], capture_output=True, text=True,
                            cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                           "EPREUVE_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: nan.yaml, line 7, metrics.empty_masks.both_empty: "
                                    "unknown key 'both_empty'")


def test_classification_rankings_name_computed_metrics(tmp_path):
    base = GOOD.replace("task: segmentation", "task: classification").replace(
        "{kind: segmentation, filename: mask.nii.gz, labels: [0, 1]}",
        "{kind: probabilities, filename: predictions.csv, classes: [a, b]}")
    (tmp_path / "c.yaml").write_text(base.replace("{metric: dice, label: 1}",
                                                  "{metric: roc_auc_macro}"))
    challenge = load_challenge(tmp_path / "c.yaml")
    assert challenge.larger_is_better("roc_auc_macro")
    (tmp_path / "c.yaml").write_text(base.replace("{metric: dice, label: 1}",
                                                  "{metric: auc}"))
    with pytest.raises(ValueError, match="unknown metric 'auc'; known: accuracy, "
                                         "balanced_accuracy, brier, roc_auc_macro"):
        load_challenge(tmp_path / "c.yaml")


def test_a_stored_definition_stays_readable_under_tighter_bounds(cli):
    from engine.challenges import challenge_definition

    assert cli(GOOD).exit_code == 0
    with cli.sessions()() as session:
        row = session.get(ChallengeRow, "c1")
        stored = json.loads(json.dumps(row.definition))
        stored["phases"][0]["limits"]["pids"] = 8  # allowed by an older version
        row.definition = stored
        session.commit()
        assert challenge_definition(row).phase("p1").limits.pids == 8


def test_empty_masks_fields_are_the_policy_fields():
    assert list(EmptyMasks.model_fields) == list(EmptyMaskPolicy.__dataclass_fields__)


def test_the_reference_in_docs_is_the_generated_one():
    assert (REPO / "docs" / "challenge-file.md").read_text() == markdown()


def test_the_schema_command_prints_it(monkeypatch):
    result = CliRunner().invoke(app, ["challenge", "schema"])
    assert result.exit_code == 0 and result.output == markdown()
    json_result = CliRunner().invoke(app, ["challenge", "schema", "--format", "json"])
    assert '"time_per_case"' in json_result.output and '"kind": "duration"' in \
        json_result.output


# -- re-registering ---------------------------------------------------------------------------


def test_changing_a_challenge_with_submissions_needs_force(cli, monkeypatch):
    from engine.db.models import ImageRow, SubmissionRow, TeamRow

    assert cli(GOOD).exit_code == 0
    assert cli(GOOD).exit_code == 0  # the same file again: nothing changes, nothing asked
    with cli.sessions()() as session:
        phase = session.scalar(select(PhaseRow))
        team, image = TeamRow(name="t"), ImageRow(image_id="sha256:" + "0" * 64, layers=[],
                                                  reference="x", architecture="amd64",
                                                  user="1000", size_bytes=1)
        session.add_all([team, image])
        session.flush()
        session.add(SubmissionRow(phase_id=phase.id, team_id=team.id, image_pk=image.id))
        session.commit()
    changed = GOOD.replace("time_per_case: 90s", "time_per_case: 2m").replace(
        "metric: dice", "metric: iou")
    refused = cli(changed)
    assert refused.exit_code == 1
    assert "challenge c1 already has submissions (p1: 1); this file would change:" in \
        refused.output
    assert "  - ranking.metrics: [{\"metric\": \"dice\", \"label\": 1}] -> " \
           "[{\"metric\": \"iou\", \"label\": 1}]" in refused.output
    assert "  - phase p1: limits.time_per_case: 90.0 -> 120.0" in refused.output
    assert "--force" in refused.output
    with cli.sessions()() as session:
        stored = session.get(ChallengeRow, "c1").definition
        assert stored["phases"][0]["limits"]["time_per_case"] == 90.0
    removed = cli(GOOD.replace("id: p1", "id: p2"), "--force")
    assert removed.exit_code == 1
    assert "phase(s) p1 have submissions and cannot be removed" in removed.output
    forced = cli(changed, "--force")
    assert forced.exit_code == 0, forced.output
    with cli.sessions()() as session:
        stored = session.get(ChallengeRow, "c1").definition
        assert stored["phases"][0]["limits"]["time_per_case"] == 120.0
        (event,) = session.scalars(select(EventRow).where(EventRow.entity == "phase")).all()
        assert event.to_state == "redefined"
        assert "phase p1: limits.time_per_case: 90.0 -> 120.0" in event.detail


# -- every field, hostile values ----------------------------------------------------------------

HOSTILE = [float("nan"), float("inf"), -1, True, [], {}, None, "x" * 5000, 10**30, [[1]]]


def _paths(node, prefix=()):
    """Every value's location in the parsed file, plus an unknown key in every mapping."""
    if isinstance(node, dict):
        yield (*prefix, "surprise")
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))
    if prefix:
        yield prefix


def _replaced(data, path, value):
    data = json.loads(json.dumps(data))
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def test_any_hostile_value_anywhere_is_refused_with_its_line_or_harmless(tmp_path):
    """Never another exception than ChallengeError; a refusal always names a line."""
    import yaml

    base = yaml.safe_load(GOOD)
    path = tmp_path / "c.yaml"
    accepted = set()
    for where in _paths(base):
        for value in HOSTILE:
            path.write_text(yaml.safe_dump(_replaced(base, where, value)))
            try:
                load_challenge(path)
            except ChallengeError as error:
                assert ", line " in str(error), (where, value, str(error))
            else:
                accepted.add((where, repr(value)[:20]))
    # only free text (checked at registration: the dataset, its case ids) and empty
    # containers (the defaults) survive
    free_text = {("title",), ("phases", 0, "dataset", "path"), ("phases", 0, "sample_cases", 0)}
    assert {(where, value) for where, value in accepted
            if where not in free_text and value not in ("{}", "[]")} == set()
