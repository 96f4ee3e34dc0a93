"""Pages of a list that grows: `limit` (at most MAX_LIMIT) and `offset`, and the next offset;
row ids in paths, bounded as the databases store them."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from engine.challenges import SLUG

T = TypeVar("T")
DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET = 50, 200, 1_000_000_000


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None  # None: this is the last page


MAX_ID = 2**31 - 1  # the databases' integer keys: a larger id names nothing
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description="a row id")]
# challenge and phase ids are slugs (engine/challenges.py): anything else names nothing,
# and never reaches the database (PostgreSQL refuses a NUL in text)
Slug = Annotated[str, Path(pattern=SLUG, description="a challenge or phase id")]
SlugFilter = Annotated[str | None, Query(pattern=SLUG)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")]


def page_of(items: list, total: int, limit: int, offset: int) -> dict:
    following = offset + len(items)
    return {"items": items, "total": total, "limit": limit, "offset": offset,
            "next_offset": following if following < total else None}


def paged_rows(session: Session, query: Select, limit: int, offset: int) -> tuple[list, int]:
    """One page of `query`'s rows (the query carries its own order) and the total."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = list(session.scalars(query.limit(limit).offset(offset)))
    return rows, total or 0
