"""Migration 0003 on a database written before it: every submission and job gets its phase's
current dataset version and case set, and that version's case inputs are recorded when its
manifest is still the one on disk. SQLite and PostgreSQL, both real."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from engine.datasets import case_input_digests, load, seal
from engine.db import MIGRATIONS, make_engine
from engine.synthetic import synth_dataset


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def urls(tmp_path) -> list[str]:
    found = [f"sqlite:///{tmp_path / 'old.db'}"]
    postgres = os.environ.get("EPREUVE_TEST_POSTGRES_URL")
    if postgres:
        engine = sa.create_engine(postgres)
        with engine.begin() as db:  # a clean schema, not migrated: this test migrates it
            db.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()
        found.append(postgres)
    return found


def old_rows(engine: sa.Engine, kept: str, kept_cases: list[str], gone: str, tmp_path) -> None:
    """What 0001 held: two phases (one whose dataset was re-sealed on disk since), a
    submission with a job in each."""
    now = datetime.now(UTC)
    meta = sa.MetaData()
    meta.reflect(engine)
    t = meta.tables
    with engine.begin() as db:
        db.execute(t["challenges"].insert().values(id="c", title="c", task="segmentation",
                                                   definition={}, definition_sha256="0" * 64,
                                                   created_at=now))
        db.execute(t["phases"].insert(), [
            dict(id=1, challenge_id="c", slug="kept", dataset_path=str(tmp_path / "kept"),
                 dataset_version=kept, case_ids=kept_cases),
            dict(id=2, challenge_id="c", slug="gone", dataset_path=str(tmp_path / "kept"),
                 dataset_version=gone, case_ids=["x-1"])])
        db.execute(t["teams"].insert().values(id=1, name="t", created_at=now))
        db.execute(t["images"].insert().values(id=1, image_id="sha256:" + "a" * 64, layers=[],
                                               reference="r", architecture="amd64", user="1:1",
                                               size_bytes=1, created_at=now))
        for sid in (1, 2):
            db.execute(t["submissions"].insert().values(
                id=sid, phase_id=sid, team_id=1, image_pk=1, status="succeeded",
                prize_eligible=True, counts_against_quota=True, created_at=now))
            db.execute(t["jobs"].insert().values(
                id=sid, submission_id=sid, kind="smoke", case_ids=["x"], status="succeeded",
                priority=0, gpus=0, attempts=1, max_attempts=3, created_at=now))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_existing_rows_are_filled_from_their_phase(tmp_path, backend):
    choices = {u.split(":")[0].split("+")[0]: u for u in urls(tmp_path)}
    if backend not in choices:
        if os.environ.get("CI"):
            pytest.fail("EPREUVE_TEST_POSTGRES_URL is not set: scripts/test starts PostgreSQL")
        pytest.skip("no PostgreSQL: set EPREUVE_TEST_POSTGRES_URL")
    url = choices[backend]
    synth_dataset(tmp_path / "kept", cases=2, seed=3, size=16)
    dataset = seal(tmp_path / "kept")
    gone = "f" * 64  # a version no manifest on disk has any more
    command.upgrade(alembic_config(url), "0001")
    engine = make_engine(url)
    old_rows(engine, dataset.version, dataset.case_ids, gone, tmp_path)

    command.upgrade(alembic_config(url), "0003")

    with engine.connect() as db:
        submissions = db.execute(sa.text("SELECT id, dataset_version, case_ids FROM submissions "
                                         "ORDER BY id")).all()
        jobs = dict(db.execute(sa.text("SELECT id, dataset_version FROM jobs")).all())
        versions = dict(db.execute(sa.text(
            "SELECT version, case_inputs FROM dataset_versions")).all())
    as_list = [(s.id, s.dataset_version, _json(s.case_ids)) for s in submissions]
    assert as_list == [(1, dataset.version, dataset.case_ids), (2, gone, ["x-1"])]
    assert jobs == {1: dataset.version, 2: gone}
    assert list(versions) == [dataset.version]  # the re-sealed one's inputs are not known
    assert _json(versions[dataset.version]) == case_input_digests(
        load(tmp_path / "kept").manifest)
    command.downgrade(alembic_config(url), "0001")  # and back, losing only what it added
    with engine.connect() as db:
        assert "dataset_versions" not in sa.inspect(db).get_table_names()
        assert db.execute(sa.text("SELECT count(*) FROM submissions")).scalar() == 2
    engine.dispose()


def _json(value):
    import json

    return json.loads(value) if isinstance(value, str) else value
