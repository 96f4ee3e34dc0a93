"""Who is calling: a bearer token, checked once per request, as a `Principal`.

    principal: Principal = Depends(authenticated())          any valid non-worker token
    principal: Principal = Depends(require_role("admin"))   only these roles
    principal: Principal | None = Depends(anonymous_allowed())  public routes

A missing, unknown, revoked or expired token is 401; a valid token whose role or scope
does not allow the call is 403. Worker tokens may make only the worker calls
(`authenticated(worker=True)`): everywhere else they get 403. A public route with a bad
token is 401 too: a client learns its token is dead instead of silently seeing less.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.api.database import DbSession
from engine.tokens import SCOPED_ROLES, Forbidden, Role, Unauthenticated, authenticate

bearer = HTTPBearer(auto_error=False, description="An Épreuve token (epv_...)")
# a public route's OpenAPI: a token is optional (`{}`: none needed)
OPTIONAL_TOKEN = {"security": [{}, {"HTTPBearer": []}]}


@dataclass(frozen=True)
class Principal:
    token_id: int
    role: Role
    team_id: int | None
    challenge_ids: frozenset[str]

    @property
    def is_participant(self) -> bool:
        return self.role == Role.PARTICIPANT

    def manages(self, challenge_id: str) -> bool:
        """May change this challenge and its submissions (cancel, re-run, redefine)."""
        return self.role == Role.ADMIN or (self.role == Role.ORGANISER
                                           and challenge_id in self.challenge_ids)

    def oversees(self, challenge_id: str) -> bool:
        """Sees everything of this challenge (hidden leaderboards, every submission)."""
        return self.role == Role.ADMIN or (self.role in SCOPED_ROLES
                                           and challenge_id in self.challenge_ids)

    @property
    def actor(self) -> str:
        """How the history (events) names this caller."""
        return f"api token {self.token_id} ({self.role})"


def _principal(session, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    if credentials is None:
        raise Unauthenticated("this call needs a token: send 'Authorization: Bearer epv_...'")
    row = authenticate(session, credentials.credentials)
    # the token's last use is its own unit of work: on SQLite a write left open for the
    # whole request would lock out the request's other sessions (a worker's claim)
    session.commit()
    return Principal(token_id=row.id, role=Role(row.role), team_id=row.team_id,
                     challenge_ids=frozenset(row.challenge_ids or ()))


def _no_worker(principal: Principal) -> Principal:
    if principal.role == Role.WORKER:
        raise Forbidden("a worker token may only make the worker calls")
    return principal


def authenticated(*, worker: bool = False) -> Callable[..., Principal]:
    """A dependency: the caller's Principal (any role but worker, or only worker)."""

    def dependency(request: Request, session: DbSession,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
                   ) -> Principal:
        principal = _principal(session, credentials)
        if worker and principal.role != Role.WORKER:
            raise Forbidden("only a worker token may make this call")
        if not worker:
            _no_worker(principal)
        request.state.principal = principal
        return principal

    return dependency


def require_role(*roles: str) -> Callable[..., Principal]:
    """A dependency: the caller's Principal if its role is one of `roles`, else 403."""
    allowed = {Role(role) for role in roles}

    def dependency(request: Request, session: DbSession,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
                   ) -> Principal:
        principal = _principal(session, credentials)
        if principal.role not in allowed:
            raise Forbidden(f"a {principal.role} token may not make this call (needs: "
                            f"{', '.join(sorted(allowed))})")
        request.state.principal = principal
        return principal

    return dependency


def anonymous_allowed() -> Callable[..., Principal | None]:
    """A dependency for public routes: None without a token; a token, when sent, must be
    valid (401 otherwise) and not a worker's (403)."""

    def dependency(request: Request, session: DbSession,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
                   ) -> Principal | None:
        if credentials is None:
            return None
        principal = _no_worker(_principal(session, credentials))
        request.state.principal = principal
        return principal

    return dependency
