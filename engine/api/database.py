"""One database session per request, committed once at the edge.

The dependency runs around the route function (`scope="function"`): the commit happens
before the response is sent, so a client never reads 200 for work that was then lost; any
exception rolls the whole request back. Domain code only flushes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session


def request_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


DbSession = Annotated[Session, Depends(request_session, scope="function")]
