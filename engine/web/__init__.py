"""The browser pages: server-rendered from the same services and rules as the API.

    /                                   the challenges
    /challenges/{id}                    a challenge: phases, dates, rules
    /challenges/{id}/phases/{phase}     a phase's leaderboard, as visibility allows
    /submissions, /submissions/{id}     a team's submissions (engine/api/access.py decides)
    /dashboard                          organisers: queue, running jobs, failures, workers
    /sign-in, /sign-out                 a token kept in an HttpOnly cookie

`create_site` is the server `epreuve serve` runs: the API (engine/api/app.create_app) with
the pages added. The pages depend on the API's rules, never the reverse (import-linter's
acyclic contract), so the API's factory does not import them.

Every page is rendered by Jinja2 with autoescape on; scripts are files under /static (the
Content-Security-Policy allows no inline script); every POST form carries a CSRF token.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from engine.api.app import ApiOptions, create_app
from engine.config import Settings

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add the pages and their static files to the API's application."""
    from engine.web import dashboard, pages, signin

    for module in (signin, pages, dashboard):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def create_site(settings: Settings, options: ApiOptions | None = None) -> FastAPI:
    """The API and the browser pages in one application."""
    app = create_app(settings, options)
    install(app)
    return app
