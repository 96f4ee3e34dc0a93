"""The database: one engine per URL, sessions, and migrations (Alembic, always).

SQLite (the default) runs in WAL mode with foreign keys on and a busy timeout,
so a worker and the command line can share it. PostgreSQL is used by URL.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _ensure_sqlite_directory(url: str) -> None:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str) -> Engine:
    _ensure_sqlite_directory(url)
    # as many connections as the server has request threads (anyio's 40), so that a busy
    # server queues in its threads rather than failing requests on an empty pool
    pool = {"pool_size": 10, "max_overflow": 40, "pool_timeout": 30}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30},
                               **(pool if ":memory:" not in url else {}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def migrate(url: str) -> None:
    """Bring the schema to the newest revision."""
    _ensure_sqlite_directory(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def session_factory(url: str, *, upgrade: bool = True) -> sessionmaker[Session]:
    if upgrade:
        migrate(url)
    return sessionmaker(make_engine(url), expire_on_commit=False)
