"""A tiny app around the upload router, for tests run under a real uvicorn:

    python -m uvicorn --factory tests.uploads_app:create_app --host 127.0.0.1 --port P

Settings from the environment (EPREUVE_DATA_DIR, EPREUVE_DATABASE_URL); fixed test tokens
from EPREUVE_TEST_TOKENS, a JSON object {"token": [token_id, role, team_id or null]}.
The real app's authentication and error handler replace the two small ones here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse

from engine.api.uploads import build_router
from engine.config import load_settings
from engine.errors import EpreuveError


@dataclass(frozen=True)
class Principal:
    token_id: int
    role: str
    team_id: int | None
    challenge_ids: tuple = ()


class Unauthenticated(EpreuveError):
    http_status = 401


def _tokens() -> dict[str, Principal]:
    table = json.loads(os.environ.get("EPREUVE_TEST_TOKENS") or "{}")
    return {token: Principal(token_id, role, team) for token, (token_id, role, team)
            in table.items()}


def create_app() -> FastAPI:
    tokens = _tokens()

    def principal(authorization: str | None = Header(None)) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or token not in tokens:
            raise Unauthenticated("a valid token is required: Authorization: Bearer <token>")
        return tokens[token]

    expiry = timedelta(seconds=float(os.environ.get("EPREUVE_UPLOAD_EXPIRY_SECONDS")
                                     or 86400))
    app = FastAPI()
    app.include_router(build_router(load_settings(), principal, upload_expiry=expiry))

    @app.exception_handler(EpreuveError)
    async def expected_failure(request: Request, exc: EpreuveError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": {
            "type": type(exc).__name__, "reason": getattr(exc, "reason", None),
            "message": str(exc)}})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    return app
