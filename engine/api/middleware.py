"""What wraps every request: a body cap and security headers.

Plain ASGI middlewares (no buffering of bodies). Requests are counted by route template
by engine.metrics.RequestMetrics.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = b"frame-ancestors 'none'"  # the interactive docs load their own scripts
DOCS_PATHS = ("/docs", "/redoc")


def _too_large(limit: int) -> bytes:
    return json.dumps({"error": {"type": "PayloadTooLarge", "reason": None,
                                 "message": f"the request body is larger than {limit} bytes"}
                       }).encode()


# a refused body is read (and dropped) up to this much before the answer, so the client
# reads the 413 instead of a reset connection; a larger one is cut off
DRAIN_BYTES = 16 << 20


async def _drain(receive: Receive, most: int) -> None:
    drained = 0
    while drained <= most:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        drained += len(message.get("body", b""))


class BodyCap:
    """Refuse bodies over `limit` bytes (413): by Content-Length at once, and while
    reading a body of unannounced length. Paths under `exempt` (uploads) stream their own."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _drain(receive, DRAIN_BYTES)
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body"):
                        await _drain(receive, DRAIN_BYTES)
                    raise StarletteHTTPException(413, f"the request body is larger than "
                                                      f"{self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send) -> None:
        body = _too_large(self.limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *SECURITY_HEADERS,
                                (b"content-security-policy", API_CSP)]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """nosniff, no framing, no referrer; `no-store` on every response to a request that
    carried credentials (a shared cache never keeps a participant's results)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authenticated = any(name == b"authorization" for name, _ in scope["headers"])
        docs = scope["path"].startswith(DOCS_PATHS)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in {k2 for k2, _ in SECURITY_HEADERS}]
                headers += SECURITY_HEADERS
                # a page sets its own policy (engine/web/rendering.py): kept, not doubled
                if not any(k.lower() == b"content-security-policy" for k, _ in headers):
                    headers.append((b"content-security-policy",
                                    DOCS_CSP if docs else API_CSP))
                if authenticated:
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)

