"""The HTTP API (FastAPI): routers, authentication, uploads."""
