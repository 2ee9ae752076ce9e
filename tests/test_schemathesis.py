"""Property-based run of the whole API against its own /openapi.json (schemathesis), with a
real admin token against the real stack: no 5xx, no answer outside the documented schema."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# What the contract promises: no 5xx, and only documented statuses, types and bodies. Not
# "every schema-valid request is accepted": random bytes are a schema-valid `file` but no image.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


@pytest.fixture()
def api_schema(app, stack):
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture()
def admin_token(make_user):
    return make_user(balance=100_000, admin=True)[1]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_contract(case, admin_token):
    case.call_and_validate(headers={"Authorization": "Bearer " + admin_token}, checks=CHECKS)
