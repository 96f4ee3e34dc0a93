"""One error body for every failure, mapped once:

    {"error": {"type": "<error class>", "reason": "<FailureReason or null>", "message": "..."}}

An expected failure (engine/errors.py) keeps its class name and HTTP status; FastAPI's own
404, 405 and validation errors get the same shape; anything else is a 500 that says
nothing of the host (no traceback, no path): it goes to the server's log instead.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EpreuveError, expected, http_status

log = logging.getLogger("epreuve.api")

HTTP_TYPES = {400: "BadRequest", 401: "Unauthenticated", 403: "Forbidden", 404: "NotFound",
              405: "MethodNotAllowed", 406: "NotAcceptable", 413: "PayloadTooLarge",
              415: "UnsupportedMediaType", 429: "RateLimited"}
MAX_VALIDATION_MESSAGES = 10


class ErrorDetail(BaseModel):
    type: str
    reason: str | None = None
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class RateLimited(EpreuveError):
    """Too many expensive calls with one token: wait `retry_after` seconds."""

    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# documented on every route that takes a token (OpenAPI `responses=`)
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No token, or an unknown, revoked or expired one"},
    403: {"model": ErrorBody, "description": "The token's role or scope does not allow this"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody,
                                                    "description": "Not found (or not yours)"}}


def error_response(status: int, type_: str, message: str, reason: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(type=type_, reason=reason, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _reason(exc: BaseException) -> str | None:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, Enum):
        return str(reason.value)
    return reason if isinstance(reason, str) else None


async def _expected(request: Request, exc: Exception) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return error_response(http_status(exc), type(exc).__name__, str(exc), _reason(exc), headers)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = HTTP_TYPES.get(exc.status_code, "HTTPError")
    message = exc.detail if isinstance(exc.detail, str) else type_
    return error_response(exc.status_code, type_, message, headers=exc.headers)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """Which field is wrong and why; never the submitted value itself."""
    assert isinstance(exc, RequestValidationError)
    problems = [f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg')}"
                for error in exc.errors()[:MAX_VALIDATION_MESSAGES]]
    return error_response(422, "RequestInvalid", "; ".join(problems) or "invalid request")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database did not answer in time (its connections all busy, or it is down):
    the platform's state, not the request's fault; the client may retry shortly."""
    log.warning("the database is unavailable on %s %s: %s", request.method, request.url.path,
                type(exc).__name__)
    return error_response(503, "Unavailable", "the server's database is busy or unreachable; "
                          "try again in a few seconds", headers={"Retry-After": "5"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if expected(exc):  # raised where no handler sat (a middleware): still the family's
        return await _expected(request, exc)
    log.exception("unexpected failure on %s %s", request.method, request.url.path,
                  exc_info=exc)
    return error_response(500, "InternalError", "the server failed on this request; it has "
                          "been logged, please try again later or report it")


def install_error_handlers(app: FastAPI) -> None:
    from gpu.allocator import NotEnoughGPUs
    from runners.base import RunnerError

    for family in (EpreuveError, RunnerError, NotEnoughGPUs):
        app.add_exception_handler(family, _expected)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _invalid)
    # a pool with no free connection, a database that does not answer: 503, never a 500
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _database_unavailable)
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _database_unavailable)
    app.add_exception_handler(sqlalchemy.exc.InterfaceError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
