"""Who is reading a page: the token kept in an HttpOnly cookie, and the CSRF tokens.

The cookie holds the token's secret (HttpOnly: no script reads it; SameSite=Strict:
another site's page never sends it; Secure when the page came over https). It is
checked on every request by engine/tokens.authenticate, as a bearer token is, so a
revoked token signs its browser out at once.

CSRF: every POST form carries a hidden `csrf` field. Signed in, it is an HMAC of the
session's secret (an attacker's page can neither read nor compute it); the sign-in form,
before any session exists, uses a random nonce kept in its own cookie (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response

from engine.api.auth import Principal
from engine.api.database import DbSession
from engine.tokens import Forbidden, Role, Unauthenticated, authenticate

TOKEN_COOKIE = "epreuve_token"
SIGNIN_COOKIE = "epreuve_signin"
CSRF_FIELD = "csrf"


class CsrfRefused(Forbidden):
    """A POST form without this session's CSRF token (a forged or stale form)."""


def principal_of(session, secret: str) -> Principal | None:
    try:
        row = authenticate(session, secret)
    except Unauthenticated:
        return None
    if row.role == Role.WORKER:  # a worker token reads no page
        return None
    return Principal(token_id=row.id, role=Role(row.role), team_id=row.team_id,
                     challenge_ids=frozenset(row.challenge_ids or ()))


def viewer(request: Request, session: DbSession) -> Principal | None:
    """The signed-in principal, or None (anonymous, or a dead cookie: it is cleared)."""
    secret = request.cookies.get(TOKEN_COOKIE)
    principal = principal_of(session, secret) if secret else None
    request.state.page_principal = principal
    request.state.page_secret = secret if principal else None
    request.state.stale_cookie = bool(secret) and principal is None
    return principal


Viewer = Annotated[Principal | None, Depends(viewer)]


def signed_in(principal: Principal | None) -> Principal:
    if principal is None:
        raise Unauthenticated("sign in with your token to see this page")
    return principal


def session_csrf(secret: str) -> str:
    return hmac.new(secret.encode(), b"epreuve page csrf v1", hashlib.sha256).hexdigest()


def csrf_token(request: Request) -> str:
    """The value this page's forms must send back."""
    secret = getattr(request.state, "page_secret", None)
    if secret:
        return session_csrf(secret)
    nonce = request.cookies.get(SIGNIN_COOKIE) or getattr(request.state, "new_nonce", None)
    if not nonce:
        nonce = request.state.new_nonce = secrets.token_urlsafe(32)
    return nonce


def check_csrf(request: Request, sent: str | None) -> None:
    """Refuse a POST whose form does not carry the session's CSRF token."""
    secret = getattr(request.state, "page_secret", None)
    expected = session_csrf(secret) if secret else request.cookies.get(SIGNIN_COOKIE)
    if not expected or not sent or not hmac.compare_digest(expected.encode(),
                                                           sent.encode()):
        raise CsrfRefused("this form is out of date or was not sent from this site: "
                          "reload the page and try again")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def remember_signin_nonce(request: Request, response: Response) -> None:
    """Set the cookies a rendered page needs: a fresh sign-in nonce; a dead token cleared."""
    nonce = getattr(request.state, "new_nonce", None)
    if nonce:
        response.set_cookie(SIGNIN_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=_secure(request), path="/")
    if getattr(request.state, "stale_cookie", False):
        response.delete_cookie(TOKEN_COOKIE, path="/")


def keep_token(request: Request, response: Response, secret: str) -> None:
    response.set_cookie(TOKEN_COOKIE, secret, httponly=True, samesite="strict",
                        secure=_secure(request), path="/")
    response.delete_cookie(SIGNIN_COOKIE, path="/")


def forget_token(response: Response) -> None:
    response.delete_cookie(TOKEN_COOKIE, path="/")
