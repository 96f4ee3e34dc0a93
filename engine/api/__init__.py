"""The HTTP API (FastAPI): `create_app(settings)` in app.py; one module per resource
(authentication, uploads, challenges, submissions, leaderboards, teams, health)."""
