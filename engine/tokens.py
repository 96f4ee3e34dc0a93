"""API tokens: random secrets, stored hashed, shown once, revocable, and may expire.

A secret is `epv_` followed by 32 random bytes (URL-safe base64): the prefix makes a
leaked token recognisable to secret scanners. Only its sha256 is stored; a presented
secret is looked up by its hash and compared again in constant time. The first twelve
characters are kept for display (`token list`), which never shows a secret.

Roles:
    admin        everything
    organiser    manages the challenges in its scope (create or update them, every
                 submission, hidden leaderboards, cancel, re-run)
    reviewer     reads what an organiser reads, in its scope; changes nothing
    participant  belongs to one team: its own submissions, public leaderboards
    worker       the worker calls only (none yet): 403 on every other route
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.db.models import ChallengeRow, TeamRow, TokenRow, utcnow
from engine.errors import EpreuveError, NotFound
from engine.submissions import get_or_create_team

SECRET_PREFIX = "epv_"
SHOWN_PREFIX = 12  # characters of the secret kept for display
MAX_SECRET = 200  # longer presented strings are refused before hashing
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most this often


class Role(StrEnum):
    ADMIN = "admin"
    ORGANISER = "organiser"
    REVIEWER = "reviewer"
    PARTICIPANT = "participant"
    WORKER = "worker"


SCOPED_ROLES = (Role.ORGANISER, Role.REVIEWER)


class TokenRefused(EpreuveError, ValueError):
    """A token cannot be created as asked (a team for a non-participant, no scope...)."""


class Unauthenticated(EpreuveError):
    """No token, or one that is unknown, revoked or expired."""

    http_status = 401


class Forbidden(EpreuveError):
    """A valid token whose role or scope does not allow the call."""

    http_status = 403


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def create_token(session: Session, role: str, *, team: str | None = None,
                 challenges: list[str] | tuple[str, ...] = (),
                 expires_in: timedelta | None = None, note: str | None = None,
                 now: datetime | None = None) -> tuple[TokenRow, str]:
    """A new token and its secret (the only time the secret exists outside the caller).
    Flushes; the caller commits."""
    role = _role(role)
    now = now or utcnow()
    team_row = _team_for(session, role, team)
    scope = _scope_for(session, role, list(challenges))
    if expires_in is not None and expires_in <= timedelta(0):
        raise TokenRefused("an expiry must be in the future (e.g. 30d, 12h)")
    secret = new_secret()
    row = TokenRow(hash=hash_secret(secret), prefix=secret[:SHOWN_PREFIX], role=role.value,
                   team=team_row, challenge_ids=scope, note=note, created_at=now,
                   expires_at=None if expires_in is None else now + expires_in)
    session.add(row)
    session.flush()
    return row, secret


def _role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise TokenRefused(f"unknown role {role!r}: one of "
                           f"{', '.join(r.value for r in Role)}") from None


def _team_for(session: Session, role: Role, team: str | None) -> TeamRow | None:
    if role == Role.PARTICIPANT:
        if not team:
            raise TokenRefused("a participant token belongs to a team: give --team")
        return get_or_create_team(session, team)  # checks a new name (team_name_problem)
    if team:
        raise TokenRefused(f"a {role} token belongs to no team (only participant tokens do)")
    return None


def _scope_for(session: Session, role: Role, challenges: list[str]) -> list[str]:
    """Organiser and reviewer tokens name their challenges. An organiser may be scoped to a
    challenge id that does not exist yet: it may then create that challenge (and no other)."""
    if role not in SCOPED_ROLES:
        if challenges:
            raise TokenRefused(f"a {role} token has no challenge scope (only organiser and "
                               "reviewer tokens do)")
        return []
    if not challenges:
        raise TokenRefused(f"a {role} token is scoped to challenges: give --challenge")
    if role == Role.REVIEWER:
        missing = [c for c in challenges if session.get(ChallengeRow, c) is None]
        if missing:
            raise TokenRefused(f"no challenge {missing[0]!r}: a reviewer token reads "
                               "existing challenges")
    return sorted(set(challenges))


def revoke_token(session: Session, token_id: int, now: datetime | None = None) -> TokenRow:
    row = session.get(TokenRow, token_id)
    if row is None:
        raise NotFound(f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.flush()
    return row


def list_tokens(session: Session) -> list[TokenRow]:
    return list(session.scalars(select(TokenRow).order_by(TokenRow.id)))


def authenticate(session: Session, secret: str, now: datetime | None = None) -> TokenRow:
    """The live token whose secret this is, or Unauthenticated. Only the holder of a real
    secret learns that it was revoked or expired; a guesser always reads "not valid"."""
    now = now or utcnow()
    if not secret or len(secret) > MAX_SECRET or not secret.isascii():
        raise Unauthenticated("the token is not valid")
    digest = hash_secret(secret)
    row = session.scalar(select(TokenRow).where(TokenRow.hash == digest))
    if row is None or not hmac.compare_digest(row.hash, digest):
        raise Unauthenticated("the token is not valid")
    if row.revoked_at is not None:
        raise Unauthenticated("the token has been revoked: ask for a new one")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated("the token has expired: ask for a new one")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    return row
