"""Templates, page responses and the page form of the one error family.

A page answers HTML, never the API's JSON error body: an expected failure
(engine/errors.py) is rendered as an error page with its class's HTTP status, and the
request's database work is rolled back first. Pages carry their own
Content-Security-Policy (engine/api/middleware.py keeps it): scripts from this server
only, no inline script; inline styles are allowed because matplotlib's SVG figures carry
them as attributes (they hold no participant text: matplotlib escapes it).
"""

from __future__ import annotations

import functools
import inspect
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from engine.errors import expected, http_status
from engine.plots import label
from engine.web.session import csrf_token, remember_signin_nonce

TEMPLATES = Path(__file__).parent / "templates"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"}


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float | int | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def _number(value: Any, digits: int = 4) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    if value != value or value in (float("inf"), float("-inf")):
        return "–"
    return f"{value:.{digits}f}"


environment = Environment(loader=FileSystemLoader(TEMPLATES),
                          autoescape=select_autoescape(default=True, default_for_string=True))
environment.filters.update(inert=label, when=_when, duration=_duration, number=_number)


class _Lazy:
    """A value computed when a template prints it: a page without a form sets no cookie."""

    def __init__(self, compute) -> None:
        self.compute = compute

    def __str__(self) -> str:
        return self.compute()


def render(request: Request, template: str, status_code: int = 200, **context: Any
           ) -> HTMLResponse:
    principal = getattr(request.state, "page_principal", None)
    html = environment.get_template(template).render(
        request=request, principal=principal, csrf=_Lazy(lambda: csrf_token(request)),
        **context)
    response = HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)
    remember_signin_nonce(request, response)
    return response


def error_page(request: Request, exc: BaseException) -> HTMLResponse:
    status = http_status(exc)
    return render(request, "error.html", status_code=status, status=status,
                  kind=type(exc).__name__, message=str(exc))


def page(function):
    """A page route: an expected failure becomes the error page (its status kept), after the
    request's session is rolled back; anything else goes to the API's 500 handler."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if not expected(exc):
                raise
            session = kwargs.get("session")
            if session is not None:
                session.rollback()
            return error_page(kwargs["request"], exc)

    wrapper.__signature__ = inspect.signature(function)  # FastAPI reads the parameters
    return wrapper
