"""/healthz (the database answers) and /metrics (Prometheus text)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from engine.api.database import DbSession
from engine.api.errors import ErrorBody
from engine.errors import Unavailable

router = APIRouter(tags=["health"])
log = logging.getLogger("epreuve.api")


class DatabaseUnavailable(Unavailable):
    """The database does not answer."""


class Health(BaseModel):
    status: str
    database: str


@router.get("/healthz", response_model=Health,
            responses={503: {"model": ErrorBody, "description": "The database does not answer"}})
def healthz(session: DbSession) -> Health:
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health check: the database does not answer: %s", exc)
        raise DatabaseUnavailable("the database does not answer") from None
    return Health(status="ok", database="ok")


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text exposition"}})
def metrics(request: Request) -> Response:
    """Prometheus text of the app's registry (app.state.metrics_registry)."""
    return Response(generate_latest(request.app.state.metrics_registry),
                    media_type=CONTENT_TYPE_LATEST)
