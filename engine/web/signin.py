"""/sign-in and /sign-out: a token typed into a form, kept in an HttpOnly cookie."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from engine.api.database import DbSession
from engine.tokens import Role, Unauthenticated
from engine.web.rendering import error_page, render
from engine.web.session import (
    CsrfRefused,
    Viewer,
    check_csrf,
    forget_token,
    keep_token,
    principal_of,
)

router = APIRouter(include_in_schema=False)
MAX_TOKEN_FIELD = 200  # engine/tokens.MAX_SECRET: longer is refused before hashing


@router.get("/sign-in")
def sign_in_page(request: Request, principal: Viewer) -> Response:
    return render(request, "signin.html")


@router.post("/sign-in")
def sign_in(request: Request, session: DbSession, principal: Viewer,
            token: Annotated[str, Form(max_length=MAX_TOKEN_FIELD)] = "",
            csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    refused = _refused(request, csrf)
    if refused is not None:
        return refused
    secret = token.strip()
    signed = principal_of(session, secret) if secret else None
    if signed is None:
        return render(request, "signin.html", status_code=401,
                      problem=str(Unauthenticated("the token is not valid (or is a "
                                                  "worker's): check it and try again")))
    landing = "/submissions" if signed.role == Role.PARTICIPANT else "/dashboard"
    response = RedirectResponse(landing, status_code=303)
    keep_token(request, response, secret)
    return response


@router.post("/sign-out")
def sign_out(request: Request, principal: Viewer,
             csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    refused = _refused(request, csrf)
    if refused is not None:
        return refused
    response = RedirectResponse("/", status_code=303)
    forget_token(response)
    return response


def _refused(request: Request, csrf: str) -> Response | None:
    try:
        check_csrf(request, csrf)
    except CsrfRefused as exc:
        return error_page(request, exc)
    return None
