"""The server: `create_app(settings)` builds the FastAPI application.

    epreuve serve [--host 127.0.0.1] [--port 8000]

Middlewares, outermost first: request counting (by route template), security headers,
the body cap (1 MiB; upload routes stream their own), and CORS only where origins are
configured (off by default). Errors are mapped once (errors.py); each request has one
database session committed at its end (database.py).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine.api import (
    challenges,
    health,
    leaderboards,
    nodes,
    submissions,
    teams,
    uploads,
    workers,
)
from engine.api.auth import authenticated
from engine.api.errors import install_error_handlers
from engine.api.middleware import BodyCap, SecurityHeaders
from engine.api.ratelimit import Rate, TokenBuckets
from engine.config import Settings
from engine.db import session_factory
from engine.metrics import RequestMetrics, build_registry

API_VERSION = "1"
MIB = 1 << 20


@dataclass(frozen=True)
class ApiOptions:
    max_body_bytes: int = MIB  # JSON and YAML bodies
    # stream and cap their own
    body_cap_exempt: tuple[str, ...] = ("/api/v1/uploads", "/api/v1/worker/outputs/")
    rate: Rate = field(default_factory=Rate)  # per token, per expensive route family
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers at all
    worker_lease: timedelta = timedelta(seconds=60)  # a remote attempt's lease; heartbeats renew
    sweep_seconds: float = 5.0  # how often the server re-queues expired leases
    scorer: bool = True  # a scorer thread in the server; False: `epreuve scorer` runs apart
    node_lost_after: timedelta | None = None  # unheard this long: lost (None: 3 leases)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.worker_service.start_sweeper()  # leases expire on the server's clock; scorer
    yield
    app.state.worker_service.stop_sweeper()


def create_app(settings: Settings, options: ApiOptions | None = None) -> FastAPI:
    options = options or ApiOptions()
    app = FastAPI(title="Épreuve", version=API_VERSION, openapi_url="/openapi.json",
                  docs_url="/docs", redoc_url=None,
                  description="Containerised evaluation of medical-imaging challenges. "
                              "Send a token as `Authorization: Bearer epv_...`.",
                  lifespan=_lifespan)
    app.state.settings = settings
    app.state.sessions = session_factory(settings.database_url)
    app.state.rate_limits = TokenBuckets(options.rate)
    # the app's own registry (the process-wide one is shared by everything in the process),
    # holding the engine's collectors: submissions, jobs, queue, workers, GPUs, requests
    app.state.metrics_registry = build_registry(app.state.sessions)
    # remote workers: the sweeper starts here, or with the first worker call (no lifespan)
    app.state.worker_service = workers.WorkerService(app.state, options.worker_lease,
                                                     options.sweep_seconds,
                                                     options.node_lost_after,
                                                     scorer=options.scorer)
    install_error_handlers(app)
    for module in (health, challenges, leaderboards, submissions, teams, workers, nodes):
        app.include_router(module.router)
    # resumable image uploads and submission creation; images are checked after the request
    app.include_router(uploads.build_router(settings, authenticated(),
                                            sessions=app.state.sessions))
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                           allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyCap, limit=options.max_body_bytes, exempt=options.body_cap_exempt)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetrics, registry=app.state.metrics_registry)
    return app
