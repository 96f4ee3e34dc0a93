"""Schemathesis against the live OpenAPI schema (a real server on loopback, SQLite and
PostgreSQL): no 5xx for any generated request, and every answer is one the schema
documents (status, content type, body). Each operation is its own test."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from tests.api_fixtures import build_world, start_server

MAX_EXAMPLES = 25
# a challenge body is YAML text: any string fits the schema, few are challenges (422)
YAML_BODIES = {("POST", "/api/v1/challenges"), ("PUT", "/api/v1/challenges/{challenge_id}")}
# the tus routes check their protocol headers themselves (Tus-Resumable, Upload-Length,
# Upload-Offset: 400 or 412 when absent or malformed, as the tus protocol says)
TUS_PREFIX = "/api/v1/uploads"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def schema_server(request, module_tmp):
    world = build_world(module_tmp(f"schema-{request.param}"), request.param)
    server = start_server(world, ApiOptions(rate=Rate(burst=100_000, per_second=1000.0)))
    yield server
    server.stop()


def test_the_api_honours_its_schema(schema_server):
    schema = schemathesis.openapi.from_url(f"{schema_server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {schema_server.world.tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def honours(case) -> None:
            lenient = ((case.operation.method.upper(), case.operation.path) in YAML_BODIES
                       or case.operation.path.startswith(TUS_PREFIX))
            case.call_and_validate(headers=headers, excluded_checks=[
                positive_data_acceptance] if lenient else None)

        honours()
