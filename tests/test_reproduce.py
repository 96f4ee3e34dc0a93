"""The reviewers' path: reproduce a finished submission on the platform and anywhere else
(a bundle and the released data, no server, no database), the open-source prize check (an
image built from the published source), and closing a challenge (the final record, then
results that never change).

Real Docker, real containers: one finished challenge for the module (two teams on the
threshold example, with and without smoothing: each image this module's own, by a unique
label), reproduced in several ways. The freeze runs last: it closes the module's challenge.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import docker
import pytest
from sqlalchemy import select

from engine.bundles import BundleRefused, export_bundle, open_bundle
from engine.challenges import Challenge
from engine.datasets import release, seal
from engine.db.models import CaseResultRow, EventRow, ReproductionRow, SubmissionRow
from engine.evaluation import ScoredCase
from engine.frozen import PhaseFrozen
from engine.reproduce import EXIT_CODES, compare
from engine.statuses import Verdict
from engine.store import open_store
from engine.submissions import register_challenge, submit
from engine.worker import Worker
from runners.docker import DockerRunner
from tests.conftest import REPO, build_image, postgres_sessions
from tests.engine_fixtures import make_scene, pin

EPREUVE = str(Path(sys.executable).parent / "epreuve")
DOCKER = "unix:///var/run/docker.sock"
OFFLINE_BUILD = {"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"}


def own_image(context: Path, base: str, *lines: str) -> str:
    """An image of this module alone (a unique label on `base`), tagged; its id."""
    token = uuid.uuid4().hex[:12]
    tag = f"epreuve-reproduce-test/{token}:latest"
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text("\n".join([f"FROM {base}", f"LABEL test={token}",
                                                   *lines]) + "\n")
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True, env=OFFLINE_BUILD)
    return docker.DockerClient(base_url=DOCKER).api.inspect_image(tag)["Id"]


def tag_of(image_id: str) -> str:
    (tag,) = docker.DockerClient(base_url=DOCKER).api.inspect_image(image_id)["RepoTags"]
    return tag


def present_id(image_id: str) -> bool:
    try:
        return docker.DockerClient(base_url=DOCKER).api.inspect_image(image_id)["Id"] \
            == image_id
    except docker.errors.ImageNotFound:
        return False


def remove(*references: str) -> None:
    """Only what this module built (by id or by its own tag)."""
    for reference in references:
        subprocess.run(["docker", "rmi", "-f", reference], capture_output=True)


@pytest.fixture(scope="module")
def finished(docker_engine, module_tmp):
    """A finished challenge: `alpha` (smoothing) and `beta` (no smoothing), evaluated by a
    real worker on SQLite, and alpha's bundle exported."""
    root = module_tmp("reproduce")
    threshold = build_image(REPO / "images/examples/threshold",
                            "epreuve-example/threshold:latest")
    alpha = own_image(root / "alpha", threshold)
    beta = own_image(root / "beta", threshold, 'CMD ["--no-smoothing"]')
    database_url = os.environ.get("EPREUVE_TEST_POSTGRES_URL")
    if database_url:  # the platform on real PostgreSQL, a clean schema
        postgres_sessions()
    scene = make_scene(root, database_url=database_url)
    store = open_store(scene.settings.store_dir)
    ids = {}
    try:
        with scene.sessions() as session:
            register_challenge(session, scene.challenge_file)
            session.commit()
            for team, image_id in (("alpha", alpha), ("beta", beta)):
                ids[team] = submit(session, "test-liver", "validation", team,
                                   pin(tag_of(image_id), root, store)).id
                session.commit()
        Worker(scene.sessions, scene.settings,
               DockerRunner(state_dir=scene.settings.state_dir / "runs"),
               scoring_workers=1).run(until_idle=True)
        with scene.sessions() as session:
            assert [session.get(SubmissionRow, i).status for i in ids.values()] == \
                ["succeeded", "succeeded"]
            bundle = export_bundle(session, store, ids["alpha"], root / "alpha-bundle.tar")
        yield {"root": root, "scene": scene, "ids": ids, "images": {"alpha": alpha,
               "beta": beta}, "bundle": bundle, "threshold": threshold}
    finally:
        remove(*(tag_of(i) for i in (alpha, beta) if present_id(i)), alpha, beta)


def cli(*args: str, data_dir: Path, cwd: Path | None = None,
        database_url: str | None = None) -> subprocess.CompletedProcess:
    """`epreuve ...` as a user runs it; no database URL given: none but the data dir's."""
    env = {**os.environ, "EPREUVE_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    env.pop("EPREUVE_DATABASE_URL", None)
    if database_url:
        env["EPREUVE_DATABASE_URL"] = database_url
    return subprocess.run([EPREUVE, *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def platform_cli(scene, *args: str) -> subprocess.CompletedProcess:
    """`epreuve ...` on the platform of the module's challenge."""
    return cli(*args, data_dir=scene.settings.data_dir,
               database_url=scene.settings.database_url)


def recorded_results(scene, submission_id: int) -> list[tuple]:
    with scene.sessions() as session:
        return [(r.id, r.case_id, r.metrics, r.output_sha256) for r in session.scalars(
            select(CaseResultRow).where(CaseResultRow.submission_id == submission_id)
            .order_by(CaseResultRow.id))]


def released_data(finished, into: Path) -> Path:
    """The validation set as `dataset release` publishes it, extracted into `into`."""
    archive = release(finished["scene"].root / "data" / "validation",
                      into.parent / "validation-release.tar.gz")
    into.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def changed_source(root: Path, base: str) -> Path:
    """A deliberately changed image's source: the same algorithm, without its smoothing."""
    context = root / f"changed-{uuid.uuid4().hex[:8]}"
    context.mkdir()
    (context / "Dockerfile").write_text(f'FROM {base}\nCMD ["--no-smoothing"]\n'
                                        f"LABEL test={context.name}\n")
    return context


def built_ids(before: set[str]) -> set[str]:
    """Images `--build` made (labelled so) that were not there before."""
    client = docker.DockerClient(base_url=DOCKER)
    return {i.id for i in client.images.list(filters={"label":
                                                     "org.epreuve.built-from-source=1"})} - before


# -- on the platform -----------------------------------------------------------------------


def test_reproduce_on_the_platform_is_identical_and_recorded_beside_the_original(finished):
    scene, alpha = finished["scene"], finished["ids"]["alpha"]
    before = recorded_results(scene, alpha)
    proc = platform_cli(scene, "reproduce", str(alpha), "--json")
    assert proc.returncode == EXIT_CODES[Verdict.IDENTICAL] == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verdict"] == "identical"
    assert [c["case_id"] for c in report["cases"]] == ["case-001", "case-002", "case-003"]
    assert {c["verdict"] for c in report["cases"]} == {"identical"}
    with scene.sessions() as session:
        row = session.get(ReproductionRow, report["reproduction_id"])
        assert (row.submission_id, row.source, row.verdict) == (alpha, "pinned", "identical")
        assert row.image_id == finished["images"]["alpha"]
        assert len(row.runs) == 3 and all(r["status"] == "succeeded" for r in row.runs)
        assert "reproduced (pinned image): identical" in session.scalars(
            select(EventRow.detail).where(EventRow.entity == "submission",
                                          EventRow.entity_id == alpha)).all()
    assert recorded_results(scene, alpha) == before  # never in place of the original


def test_an_image_built_from_changed_source_differs_naming_cases_metrics_and_rank(finished):
    scene, alpha = finished["scene"], finished["ids"]["alpha"]
    before = built_ids(set())
    context = changed_source(finished["root"], tag_of(finished["images"]["alpha"]))
    try:
        proc = platform_cli(scene, "reproduce", str(alpha), "--build", str(context), "--json")
        assert proc.returncode == EXIT_CODES[Verdict.DIFFERS] == 5, proc.stderr
        report = json.loads(proc.stdout)
        summary = report["summary"]
        assert report["verdict"] == "differs"
        assert summary["cases"]["differs"], summary
        assert "dice[1]" in summary["metrics_moved"] or "hd95[1]" in summary["metrics_moved"]
        assert summary["largest_difference"]["difference"] > 1e-6
        # the effect on the rank: alpha with the ablation's values, against beta
        assert summary["rank"]["rank_recorded"] == 1 and summary["rank"]["teams"] == 2
        assert summary["rank"]["rank_reproduced"] in (1, 2)
        assert summary["rank"]["scores_reproduced"] != summary["rank"]["scores_recorded"]
        with scene.sessions() as session:
            row = session.get(ReproductionRow, report["reproduction_id"])
            assert (row.source, row.verdict) == ("built", "differs")
        text = platform_cli(scene, "reproduce", str(alpha), "--build", str(context))
        assert text.returncode == 5
        assert "verdict: differs" in text.stdout and "metrics that moved:" in text.stdout
        assert "case-001: differs" in text.stdout
        # the open-source prize check, recorded on the submission, beside prize eligibility
        assert source_checks(scene) == {"alpha": "differs", "beta": "not checked"}
        status = json.loads(platform_cli(scene, "status", str(alpha), "--json").stdout)
        assert [(r["source"], r["verdict"]) for r in status["reproductions"]][-1] == \
            ("built", "differs")
        table = platform_cli(scene, "leaderboard", "test-liver", "validation").stdout
        assert "source check" in table and "differs" in table
    finally:
        remove(*built_ids(before))


def source_checks(scene) -> dict[str, str]:
    board = json.loads(platform_cli(scene, "leaderboard", "test-liver", "validation",
                                    "--json").stdout)
    return {e["team"]: e["source_check"] for e in board["entries"]}


def test_the_prize_check_verifies_an_image_built_from_the_same_source(finished):
    scene, alpha = finished["scene"], finished["ids"]["alpha"]
    before = built_ids(set())
    context = finished["root"] / "same-source"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {tag_of(finished['images']['alpha'])}\n"
                                        "LABEL rebuilt=from-source\n")
    try:
        proc = platform_cli(scene, "reproduce", str(alpha), "--build", str(context), "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["verdict"] == "identical"
        assert report["image_id"] != finished["images"]["alpha"]  # another image, same bytes out
        assert source_checks(scene) == {"alpha": "verified", "beta": "not checked"}
    finally:
        remove(*built_ids(before))


def test_a_resealed_dataset_is_refused_saying_what_to_do(finished, tmp_path):
    data = released_data(finished, tmp_path / "data")
    (top,) = data.iterdir()
    resealed = tmp_path / "resealed"
    shutil.copytree(top, resealed)
    for path in resealed.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for name in ("manifest.json", "DATA_CARD.md", "SHA256SUMS"):
        (resealed / name).unlink()
    shutil.rmtree(resealed / "inputs" / "case-003")
    shutil.rmtree(resealed / "ground_truth" / "case-003", ignore_errors=True)
    for path in (resealed / "ground_truth").glob("case-003*"):
        path.unlink()
    seal(resealed)
    proc = cli("reproduce", str(finished["bundle"]), "--data", str(resealed),
               data_dir=tmp_path / "state")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ran on dataset version" in proc.stderr and "release of that version" in proc.stderr


# -- anywhere: the bundle and the released data --------------------------------------------


def test_reviewers_reproduce_the_bundle_on_a_fresh_machine_identical(finished, tmp_path):
    """Only the bundle and the released data; no database, and the image not on the
    daemon: it is loaded from the bundle by digest."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    bundle = shutil.copy(finished["bundle"], fresh / "bundle.tar")
    data = released_data(finished, fresh / "data")
    alpha = finished["images"]["alpha"]
    tag = tag_of(alpha)
    remove(tag, alpha)
    assert not present_id(alpha)
    try:
        proc = cli("reproduce", "bundle.tar", "--data", str(data), data_dir=fresh / "state",
                   cwd=fresh)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "verdict: identical" in proc.stdout
        for case_id in ("case-001", "case-002", "case-003"):
            assert f"{case_id}: identical" in proc.stdout
        assert present_id(alpha)  # loaded from the bundle's image.tar, checked by digest
        assert not (fresh / "state" / "epreuve.db").exists()  # no database was made
        assert sorted(p.name for p in fresh.iterdir()) == ["bundle.tar", "data", "state",
                                                         "validation-release.tar.gz"]
        assert Path(bundle).is_file()
    finally:
        subprocess.run(["docker", "tag", alpha, tag], capture_output=True)


def test_a_changed_image_on_the_bundle_differs(finished, tmp_path):
    data = released_data(finished, tmp_path / "data")
    before = built_ids(set())
    context = changed_source(tmp_path, finished["threshold"])
    try:
        proc = cli("reproduce", str(finished["bundle"]), "--data", str(data), "--build",
                   str(context), "--json", data_dir=tmp_path / "state")
        assert proc.returncode == 5, proc.stderr
        report = json.loads(proc.stdout)
        assert report["verdict"] == "differs" and report["summary"]["metrics_moved"]
        assert report["summary"]["rank"] is None  # no leaderboard without the platform
    finally:
        remove(*built_ids(before))


def rewritten(bundle: Path, target: Path, change) -> Path:
    """The bundle's members through `change(name, bytes) -> [(TarInfo, bytes | None)]`."""
    with tarfile.open(bundle) as source, tarfile.open(target, "w") as out:
        for member in source:
            data = source.extractfile(member).read()
            for info, body in change(member.name, data):
                out.addfile(info, None if body is None else io.BytesIO(body))
    return target


def regular(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


def test_tampered_bundles_are_refused_before_anything_runs(finished, tmp_path):
    bundle = finished["bundle"]

    def changed_results(name, body):
        if name == "results.json":
            body = body.replace(b'"valid": false', b'"valid": true', 1).replace(b"0.", b"1.", 1)
        return [regular(name, body)]

    def climbing(name, body):
        return [regular(name, body)] + ([regular("../escaped", b"x")] if name == SUMS else [])

    def linked(name, body):
        if name != "results.json":
            return [regular(name, body)]
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return [(link, None)]

    def hard_linked(name, body):
        if name != "runs.json":
            return [regular(name, body)]
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.LNKTYPE, "image.tar"
        return [(link, None)]

    def twice(name, body):
        return [regular(name, body)] * (2 if name == "challenge.json" else 1)

    def missing(name, body):
        return [] if name == "manifest.json" else [regular(name, body)]

    def resummed(name, body):  # a changed file with SHA256SUMS left alone but an extra line
        if name == SUMS:
            body += b"0" * 64 + b"  ../../etc/passwd\n"
        return [regular(name, body)]

    SUMS = "SHA256SUMS"
    cases = {"changed": (changed_results, "changed since it was exported"),
             "climbing": (climbing, "'../escaped'"),
             "symlink": (linked, "not a regular file"),
             "hardlink": (hard_linked, "not a regular file"),
             "twice": (twice, "twice"), "missing": (missing, "lacks manifest.json"),
             "sums": (resummed, "SHA256SUMS has a line")}
    for label, (change, message) in cases.items():
        tampered = rewritten(bundle, tmp_path / f"{label}.tar", change)
        into = tmp_path / f"{label}-out"
        with pytest.raises(BundleRefused, match=message.replace("(", r"\(")):
            open_bundle(tampered, into)
        assert not (tmp_path / "escaped").exists()
        assert not (into / "store").exists()  # the image was never taken in
    proc = cli("reproduce", str(tmp_path / "changed.tar"), "--data", str(tmp_path),
               data_dir=tmp_path / "state")
    assert proc.returncode == 1 and "changed since it was exported" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the comparison and its tolerance (no container) ---------------------------------------


def scored(case_id: str, dice: float, sha: str, valid: bool = True) -> ScoredCase:
    return ScoredCase(case_id, valid, None if valid else "OUTPUT_INVALID", "m",
                      {"dice[1]": dice, "hd95[1]": 2.0}, {"mask.nii.gz": sha})


def recorded(dice: float, sha: str) -> dict:
    return {"valid": True, "reason": None, "metrics": {"dice[1]": dice, "hd95[1]": 2.0},
            "output_sha256": {"mask.nii.gz": sha}}


def challenge(tolerances: list | None = None, default: float | None = None) -> Challenge:
    metrics = {"labels": [1]}
    if tolerances is not None:
        metrics["reproduction_tolerances"] = tolerances
    if default is not None:
        metrics["reproduction_tolerance"] = default
    return Challenge.model_validate({
        "id": "c", "title": "t", "task": "segmentation",
        "output": {"kind": "segmentation", "labels": [0, 1]}, "metrics": metrics,
        "ranking": {"metrics": [{"metric": "dice", "label": 1}]},
        "phases": [{"id": "p", "dataset": {"path": "/nonexistent"}}]},
        context={"stored": True})


def test_within_tolerance_and_differs_follow_the_challenges_tolerance():
    base = {"a": recorded(0.9, "1" * 64), "b": recorded(0.8, "2" * 64)}
    same = compare(challenge(), base, {"a": scored("a", 0.9, "1" * 64),
                                       "b": scored("b", 0.8, "2" * 64)})
    assert same.verdict is Verdict.IDENTICAL and same.exit_code == 0
    nudged = {"a": scored("a", 0.9 + 5e-7, "3" * 64), "b": scored("b", 0.8, "2" * 64)}
    within = compare(challenge(), base, nudged)
    assert within.verdict is Verdict.WITHIN_TOLERANCE and within.exit_code == 4
    assert within.summary()["cases"]["within-tolerance"] == ["a"]
    moved = {"a": scored("a", 0.95, "3" * 64), "b": scored("b", 0.8, "2" * 64)}
    differs = compare(challenge(), base, moved)
    assert differs.verdict is Verdict.DIFFERS and differs.exit_code == 5
    assert differs.summary()["metrics_moved"] == ["dice[1]"]
    assert differs.summary()["largest_difference"]["case_id"] == "a"
    # a looser tolerance for dice (by name) makes the same move acceptable
    loose = challenge([{"metric": "dice", "absolute": 0.1}])
    assert compare(loose, base, moved).verdict is Verdict.WITHIN_TOLERANCE
    # the key with its label wins over the name
    keyed = challenge([{"metric": "dice", "absolute": 0.1},
                       {"metric": "dice[1]", "absolute": 0.01}])
    assert compare(keyed, base, moved).verdict is Verdict.DIFFERS
    # a case that became invalid differs, whatever its metrics
    invalid = {"a": scored("a", 0.9, "1" * 64, valid=False), "b": scored("b", 0.8, "2" * 64)}
    result = compare(loose, base, invalid)
    assert result.verdict is Verdict.DIFFERS and "(validity)" in result.cases[0].moved
    # a case missing from the re-run differs
    assert compare(challenge(), base, {"a": scored("a", 0.9, "1" * 64)}).verdict \
        is Verdict.DIFFERS


def test_a_negative_or_unknown_tolerance_is_refused_in_the_challenge_file():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="outside the allowed range"):
        Challenge.model_validate({**challenge().model_dump(mode="json"), "metrics": {
            "labels": [1], "reproduction_tolerance": -1}})
    with pytest.raises(ValidationError):
        Challenge.model_validate({**challenge().model_dump(mode="json"), "metrics": {
            "labels": [1], "reproduction_tolerances": [{"metric": "dice", "relative": 1}]}})


# -- closing the challenge (last: it freezes the module's challenge) -----------------------


def test_freeze_writes_the_final_record_and_nothing_changes_after(finished, tmp_path):
    scene, ids = finished["scene"], finished["ids"]
    before = {i: recorded_results(scene, i) for i in ids.values()}
    proc = platform_cli(scene, "challenge", "freeze", "test-liver")
    assert proc.returncode == 0, proc.stderr
    record = scene.settings.data_dir / "releases" / "test-liver" / "final-record"
    lines = (record / "validation" / "results.csv").read_text().splitlines()
    assert lines[0].startswith("submission_id,team,case_id,valid,reason,")
    assert len(lines) == 1 + 6  # two teams, three cases each
    ranking = json.loads((record / "validation" / "leaderboard.json").read_text())
    assert [e["team"] for e in ranking] == ["alpha", "beta"]
    provenance = json.loads((record / "validation" / "provenance.json").read_text())
    assert provenance[str(ids["alpha"])]["image"]["image_id"] == finished["images"]["alpha"]
    aggregates = json.loads((record / "validation" / "aggregates.json").read_text())
    assert "dice[1]" in aggregates[str(ids["alpha"])]
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=record, capture_output=True,
                          text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    # after the freeze: every path that would change a result is a clear Conflict
    from engine.lifecycle import cancel
    from engine.reruns import rerun
    from engine.rescore import rescore

    with scene.sessions() as session:
        refusals = [
            lambda: submit(session, "test-liver", "validation", "gamma",
                           pin(tag_of(finished["images"]["beta"]), finished["root"],
                               open_store(scene.settings.store_dir))),
            lambda: rerun(session, ids["alpha"], "test"),
            lambda: rescore(session, scene.settings, "test-liver", "validation",
                            submission_id=ids["alpha"]),
            lambda: cancel(session, ids["beta"], "test"),
        ]
        for refused in refusals:
            with pytest.raises(PhaseFrozen, match="frozen") as caught:
                refused()
            assert caught.value.http_status == 409
            session.rollback()
    for command in (["cancel", str(ids["beta"])],
                    ["rescore", "test-liver", "validation", "--submission", str(ids["alpha"])]):
        proc = platform_cli(scene, *command)
        assert proc.returncode == 1 and "was frozen" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    again = platform_cli(scene, "challenge", "freeze", "test-liver")
    assert again.returncode == 1 and "never overwritten" in again.stderr
    # reproducing stays open: it changes no result
    assert platform_cli(scene, "reproduce", str(ids["alpha"])).returncode == 0
    assert {i: recorded_results(scene, i) for i in ids.values()} == before
